"""Token estimates: a real tokenizer, offline, never short for a budget reservation."""

from __future__ import annotations

import os
import subprocess
import sys

from baton.llm import tokens
from baton.llm.types import Message


def test_counts_are_the_cl100k_tokenizers() -> None:
    # Known cl100k_base encodings: "hello world" is two tokens, each digit group of up to 3
    # digits one more.
    assert tokens.count("hello world") == 2
    assert tokens.count("") == 0
    assert tokens.count("1234567") == 3
    # A special-token marker in user text is counted as text, not refused.
    assert tokens.count("<|endoftext|>") > 1


def test_chat_framing_and_family_margin() -> None:
    messages = [Message("system", "Be brief."), Message("user", "hello world")]
    openai = tokens.estimate_messages(messages, "gpt-4o-mini")
    assert openai == 3 + (4 + 1 + tokens.count("Be brief.")) + (4 + 1 + 2)
    other = tokens.estimate_messages(messages, "claude-3-5-haiku-latest")
    assert other > openai  # another tokenizer: a margin on top
    assert tokens.estimate_messages(messages, "openai/gpt-4.1") == openai


def test_loads_without_network_or_a_writable_home(tmp_path: object) -> None:
    """The ranks come from the installed package: no download, no cache directory."""
    env = {
        **os.environ,
        "HOME": "/nonexistent",
        "TIKTOKEN_CACHE_DIR": "",
        "https_proxy": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
    }
    code = "from baton.llm import tokens; print(tokens.count('hello world'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"


def test_long_text_is_not_underestimated_by_the_old_rule() -> None:
    # Code tokenizes densely: three characters a token can fall short of the real count.
    text = "x=[1,2,3];y={'a':(4,5)};" * 50
    assert tokens.count(text) > len(text) / 3 + 8  # what "three characters a token" reserved
    assert tokens.estimate_messages([Message("user", text)], "gpt-4o") >= tokens.count(text)

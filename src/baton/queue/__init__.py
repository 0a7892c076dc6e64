"""Standalone jobs and cron schedules: what enters the queue besides the steps of runs."""

"""The asyncio service: one small coroutine per stage, wired in one place; it schedules and records."""

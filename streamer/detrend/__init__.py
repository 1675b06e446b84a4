"""Pure numerics of detrending: one module per instrument effect. No files, no logging set-up, no asyncio."""

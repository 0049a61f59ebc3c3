"""The console entry ``nas-scam``: above both ``api`` and ``orchestrator``, so it may import each."""

"""Runtime backends that execute exported programs (LiteRT; ExecuTorch)."""

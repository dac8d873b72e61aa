"""Device runtime: backends, trainer and link (numpy + LiteRT; never torch or tensorflow on the LiteRT path)."""

"""Building blocks of MoMoDistill (public entry point: `edgepatch.cloud.momodistill`)."""

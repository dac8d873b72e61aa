"""The contract between export, device and cloud: numpy and the standard library only."""

"""The bundle writer lives in protocol/bundle_writer.py (numpy only), so the cloud can republish a bundle
without the export toolchain; this name stays for the exporter and existing imports."""

from edgepatch.protocol.bundle_writer import DEFAULT_PATHS, BundleWriter, pack_bundle

__all__ = ["DEFAULT_PATHS", "BundleWriter", "pack_bundle"]

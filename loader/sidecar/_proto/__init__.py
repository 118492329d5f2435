"""Generated from proto/loader.proto by scripts/gen-proto; do not edit."""

"""Tools around training: ``vitscale bench`` (throughput, MFU, memory; data loaders), ``vitscale plan`` (memory per
GPU for each ZeRO stage) and ``vitscale plot`` (metrics.jsonl -> PNG). See docs/benchmarks.md."""

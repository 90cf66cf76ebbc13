"""fp8_bench, by part: helpers, harness, GEMM / DeepGEMM / proxy workers, report."""

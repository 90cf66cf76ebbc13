"""fp8_bench, by part: helpers, GEMM / DeepGEMM / proxy workers, report."""

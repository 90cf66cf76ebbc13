"""Pipeline schedules: DualPipe and DualPipeV for Megatron-Core, plus their simulator."""

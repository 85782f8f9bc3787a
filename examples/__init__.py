"""Reference example networks (plain PyTorch) used to exercise lwcompile."""

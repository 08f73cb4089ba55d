"""blis-cal: observe a live vLLM server, simulate it, calibrate the simulator."""

__version__ = "0.1.0"

"""Named shape sets. Plain cases are (N, C, dtype); linear cases are (N, D, V, dtype)."""

PLAIN = {
    "quick": [(256, 100, "float32"), (128, 1000, "bfloat16")],
    "cpu": [(4096, 1000, "float32"), (1024, 32000, "bfloat16")],
    "classifier": [(65536, 1000, "float32")],
    "lm": [(8192, 128256, "bfloat16"), (8192, 128256, "float32")],
}
PLAIN["gpu"] = PLAIN["classifier"] + PLAIN["lm"]

LINEAR = {
    "quick": [(256, 64, 1000, "float32")],
    "cpu": [(2048, 256, 32000, "float32"), (8192, 256, 32000, "float32")],
    "classifier": [],
    "lm": [(8192, 4096, 128256, "bfloat16"), (8192, 2304, 256000, "bfloat16")],
}
LINEAR["gpu"] = LINEAR["lm"]

NAMES = sorted(PLAIN)

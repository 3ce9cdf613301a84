# target: HumanEval/0
# Allocate until something breaks.
chunks = []
try:
    while True:
        chunks.append(bytearray(64 << 20))
except MemoryError:
    pass


def has_close_elements(numbers, threshold):
    return None

# target: HumanEval/0
# Write 1 GB to stdout and stderr before answering.
import os
import sys

block = b"x" * (1 << 20)
for _ in range(512):
    os.write(1, block)
    os.write(2, block)
sys.stdout.write("y" * (1 << 20))


def has_close_elements(numbers, threshold):
    return None

# target: HumanEval/0
# Return a result far over any sane reply size.
def has_close_elements(numbers, threshold):
    return "x" * (300 << 20)

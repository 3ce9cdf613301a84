# target: HumanEval/0
# Delete, overwrite, create and rename files outside the work directory (the test's victim folder).
import os
import shutil

VICTIM = "__VICTIM__"
for attack in (
    lambda: os.remove(os.path.join(VICTIM, "keep.txt")),
    lambda: open(os.path.join(VICTIM, "keep.txt"), "w").write("owned"),
    lambda: open(os.path.join(VICTIM, "new.txt"), "w").write("owned"),
    lambda: os.rename(os.path.join(VICTIM, "keep.txt"), os.path.join(VICTIM, "moved.txt")),
    lambda: shutil.rmtree(os.path.join(VICTIM, "folder")),
    lambda: os.chmod(os.path.join(VICTIM, "keep.txt"), 0o777),
    lambda: os.symlink("/etc/passwd", os.path.join(VICTIM, "link")),
):
    try:
        attack()
    except Exception:
        pass


def has_close_elements(numbers, threshold):
    return None

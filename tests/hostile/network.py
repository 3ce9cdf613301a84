# target: HumanEval/0
# Reach the network (exfiltration, or fetching answers).
import socket

for host in ("127.0.0.1", "8.8.8.8"):
    try:
        socket.create_connection((host, 53), timeout=1).close()
    except Exception:
        pass


def has_close_elements(numbers, threshold):
    return None

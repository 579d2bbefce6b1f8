"""The refleak scenarios, each run a few times in one process, for
Valgrind's memcheck (scripts/memcheck).  Works on any CPython."""
import sys

import refleak

if __name__ == "__main__":
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    for name in refleak.SCENARIOS:
        for _ in range(reps):
            getattr(refleak, name)()
        print(f"{name}: {reps} runs", flush=True)

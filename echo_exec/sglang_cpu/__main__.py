import sys

from echo_exec.sglang_cpu import main

sys.exit(main())

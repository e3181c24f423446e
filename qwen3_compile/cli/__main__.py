from qwen3_compile.cli import main

main()

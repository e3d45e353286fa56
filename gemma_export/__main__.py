from gemma_export.cli import main

main()

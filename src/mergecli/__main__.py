from mergecli.cli import main

main()

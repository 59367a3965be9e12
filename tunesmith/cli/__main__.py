from tunesmith.cli.app import main

main()

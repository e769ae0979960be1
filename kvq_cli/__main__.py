from kvq_cli.cli.app import main

main()

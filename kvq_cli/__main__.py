from kvq_cli.cli import main

main()

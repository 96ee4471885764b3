from longitudinal.cli import main

main()

from lighttransfer.cli import main

main()

from mesh._cli import main

main()

from blis_cal.cli import main

main()

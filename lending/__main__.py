from lending.cli import main

main(prog_name="python -m lending")

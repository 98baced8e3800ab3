from lending.cli import lending_main

lending_main()

import sys

if sys.argv[1:2] == ["agent"]:  # without sandboxd.cli: see sandboxd.agent.standalone
    from sandboxd.agent.standalone import main
else:
    from sandboxd.cli import main

main()

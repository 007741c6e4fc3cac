from vitscale.cli import run

run()

from rnnrep.cli import app

app(prog_name="rnnrep")

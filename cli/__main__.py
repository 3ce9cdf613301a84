from gcache_cli.main import app

app(prog_name="gcache")

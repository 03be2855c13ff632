"""Config refusals name the dotted key and the fix; secrets never print themselves."""

from __future__ import annotations

import os
import re
import stat

import pytest

from nomaflowd import config, crypto
from nomaflowd.cli import main
from nomaflowd.errors import ConfigError


def load(tree, body="", daemon=""):
    tree.write_config(body, daemon=daemon)
    return config.load(tree.config_path)


def test_relative_paths_resolve_against_the_config_directory(tree):
    cfg = load(tree)
    assert cfg.spool_dir == tree.spool.resolve()
    assert cfg.database == f"sqlite:///{tree.db_path.resolve()}"
    assert cfg.jobs_file == tree.jobs_path.resolve()


@pytest.mark.parametrize(("body", "daemon", "message"), [
    ("", "spool_dirr = 'x'", "daemon.spool_dirr is not a known setting"),
    ("", "retention_days = 'long'", "daemon.retention_days must be an integer"),
    ("", "rescan_seconds = true", "daemon.rescan_seconds must be a number"),
    ("", "retention_days = 0", "daemon.retention_days must be greater than 0"),
    ("[transports.x]\ntype = 'pager'\n", "", "transports.x.type must be one of"),
    ("[transports.x]\ntype = 'webhook'\n", "", "transports.x.url is required"),
    ("[transports.x]\ntype = 'webhook'\nurl = 'https://hooks.example/abc'\n", "",
     "transports.x.url is plaintext; encrypt it with `nomaflowd secret encrypt`"),
    ("[transports.x]\ntype = 'email'\nhost = 'h'\nport = 25\ndefault_from = 'a@b.c'\n"
     "pasword = 'x'\n", "", "transports.x.pasword is not a known setting"),
    ("[transports.x]\ntype = 'email'\nhost = 'h'\nport = 25\ndefault_from = 'a@b.c'\n"
     "tls = 'maybe'\n", "", "transports.x.tls must be one of starttls, tls, none"),
    ("[[routing]]\ntag = 'x'\n", "", "routing[0].recipients is required"),
    ("[extra]\n", "", "extra is not a known setting"),
])
def test_bad_config_is_refused_naming_the_key(tree, body, daemon, message):
    with pytest.raises(ConfigError, match=None) as info:
        load(tree, body, daemon)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_required_spool_dir(tree):
    tree.config_path.write_text("[daemon]\n")
    with pytest.raises(ConfigError, match=r"daemon\.spool_dir is required"):
        config.load(tree.config_path)


def test_run_with_bad_config_exits_2_with_one_line(tree, capsys):
    tree.write_config(daemon="spool_dirr = 'x'")
    assert main(["run", "--config", str(tree.config_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "daemon.spool_dirr" in err and "Traceback" not in err


def test_config_search_order(tree, monkeypatch, tmp_path):
    tree.write_config()
    monkeypatch.setenv("NOMAFLOWD_CONFIG", str(tree.config_path))
    assert config.find(None) == tree.config_path
    assert config.find("x.toml") == config.Path("x.toml")
    monkeypatch.delenv("NOMAFLOWD_CONFIG")
    monkeypatch.chdir(tree.root)
    assert config.find(None) == config.Path("etc/nomaflowd.toml")


def test_keygen_makes_0600_and_never_overwrites(tree, capsys):
    tree.write_config(daemon="")
    tree.key.unlink()
    assert main(["secret", "keygen", "--config", str(tree.config_path)]) == 0
    assert stat.S_IMODE(os.stat(tree.key).st_mode) == 0o600
    before = tree.key.read_bytes()
    assert main(["secret", "keygen", "--config", str(tree.config_path)]) == 1
    assert "never overwritten" in capsys.readouterr().err
    assert tree.key.read_bytes() == before


def test_keygen_and_encrypt_work_on_the_config_that_asks_for_them(tree, capsys, monkeypatch):
    """The plaintext-secret refusal says "encrypt it with nomaflowd secret encrypt": that
    command (and keygen before it) must not refuse the same config for the same reason."""
    import io

    tree.write_config('[transports.h]\ntype = "webhook"\nurl = "https://hooks.example/T0/X"\n')
    tree.key.unlink()
    with pytest.raises(ConfigError, match="secret encrypt"):
        config.load(tree.config_path)
    assert main(["secret", "keygen", "--config", str(tree.config_path)]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("https://hooks.example/T0/X\n"))
    assert main(["secret", "encrypt", "--config", str(tree.config_path)]) == 0
    token = capsys.readouterr().out.splitlines()[-1]
    tree.write_config(f'[transports.h]\ntype = "webhook"\nurl = "{token}"\n')
    assert config.load(tree.config_path).transports["h"].settings["url"].reveal() == (
        "https://hooks.example/T0/X")


def test_encrypt_then_rotate_keeps_every_secret_readable(tree, capsys, monkeypatch):
    import io

    tree.write_config()
    monkeypatch.setattr("sys.stdin", io.StringIO("https://hooks.example/T0/CANARY\n"))
    assert main(["secret", "encrypt", "--config", str(tree.config_path)]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("enc:") and "CANARY" not in token
    tree.write_config(f'[transports.h]\ntype = "webhook"\nurl = "{token}"\n'
                      f'headers = {{ Authorization = "{tree.enc("Bearer B")}" }}\n')
    old_key = tree.key.read_bytes()
    assert main(["secret", "rotate", "--config", str(tree.config_path)]) == 0
    assert "re-encrypted 2 token(s)" in capsys.readouterr().out
    assert tree.key.read_bytes() != old_key
    assert not tree.key.with_name("nomaflowd.key.new").exists()
    assert token not in tree.config_path.read_text()
    cfg = config.load(tree.config_path)
    assert cfg.transports["h"].settings["url"].reveal() == "https://hooks.example/T0/CANARY"
    assert cfg.transports["h"].settings["headers"]["Authorization"].reveal() == "Bearer B"


def test_token_from_another_key_is_refused_naming_the_field(tree, tmp_path):
    other = tmp_path / "other.key"
    crypto.write_key(other)
    token = crypto.encrypt(crypto.load_keys(other), "https://x")
    with pytest.raises(ConfigError, match=r"transports\.h\.url cannot be decrypted"):
        load(tree, f'[transports.h]\ntype = "webhook"\nurl = "{token}"\n')


@pytest.mark.parametrize("apart", [False, True], ids=["in-process", "child-process"])
def test_tokens_decrypt_alike_in_process_and_in_a_child(tree, tmp_path, apart):
    other = tmp_path / "other.key"
    crypto.write_key(other)
    mine, theirs = tree.enc("https://hooks.example/T0/CANARY"), crypto.encrypt(
        crypto.load_keys(other), "https://x")
    plain = crypto.decrypt_tokens(tree.key, [mine, theirs, mine], apart=apart)
    assert plain == {mine: "https://hooks.example/T0/CANARY"}  # another key's token left out


@pytest.mark.parametrize("apart", [False, True], ids=["in-process", "child-process"])
def test_key_file_problems_read_alike_in_process_and_in_a_child(tree, tmp_path, apart):
    token = tree.enc("x")
    with pytest.raises(ConfigError, match=r"key file \S+missing\.key not found; create it"):
        crypto.decrypt_tokens(tmp_path / "missing.key", [token], apart=apart)
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"key file \S+bad\.key is not a nomaflowd key"):
        crypto.decrypt_tokens(bad, [token], apart=apart)


@pytest.mark.parametrize("apart", [False, True], ids=["in-process", "child-process"])
@pytest.mark.parametrize("hostile", ["enc:\x01\x00abc", "enc:" + "A" * 1_000_000, "enc:%%%%",
                                     "enc:\u00e4\u20ac\U0001f600"],
                         ids=["control", "huge", "not-base64", "non-ascii"])
def test_hostile_tokens_are_refused_naming_the_field_not_the_value(tree, apart, hostile):
    good = tree.enc("https://hooks.example/T0/CANARY")
    plain = crypto.decrypt_tokens(tree.key, [hostile, good], apart=apart)
    assert plain == {good: "https://hooks.example/T0/CANARY"}  # the bad one only left out


def test_credentials_directory_key_wins(tree, tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    crypto.write_key(creds / "nomaflowd.key")
    token = crypto.encrypt(crypto.load_keys(creds / "nomaflowd.key"), "https://x")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load(tree, f'[transports.h]\ntype = "webhook"\nurl = "{token}"\n')
    assert cfg.transports["h"].settings["url"].reveal() == "https://x"


def test_secret_never_prints_itself():
    s = crypto.Secret("CANARY-123")
    assert "CANARY" not in str(s) and "CANARY" not in repr(s) and "CANARY" not in f"{s}"
    assert "CANARY" not in repr({"k": s})


@pytest.mark.parametrize(("daemon", "key"), [
    ("poll_seconds = nan", "daemon.poll_seconds"),
    ("send_timeout_seconds = inf", "daemon.send_timeout_seconds"),
    ("rescan_seconds = -inf", "daemon.rescan_seconds"),
])
def test_nan_and_inf_are_refused_naming_the_key(tree, capsys, daemon, key):
    tree.write_config(daemon=daemon)
    assert main(["run", "--config", str(tree.config_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{key} must be a finite number" in err
    assert "internal error" not in err


def test_a_binary_config_file_is_refused_in_one_line(tree, capsys):
    tree.config_path.write_bytes(b"[daemon]\nspool_dir = \"\xff\xfe\"\n")
    assert main(["run", "--config", str(tree.config_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not UTF-8 text" in err and str(tree.config_path) in err


@pytest.mark.parametrize("value", ["nobody", "", "Nomaflow <>", "a@b"])
def test_default_from_without_an_address_is_refused(tree, value):
    with pytest.raises(ConfigError) as info:
        load(tree, f'[transports.mail]\ntype = "email"\nhost = "h"\nport = 25\n'
                   f'default_from = "{value}"\n')
    assert "transports.mail.default_from must be an email address" in str(info.value)


def test_default_from_with_a_display_name_is_accepted(tree):
    from nomaflowd.routing import default_recipient

    cfg = load(tree, '[transports.mail]\ntype = "email"\nhost = "h"\nport = 25\n'
                     'default_from = "Nomaflow <Nomaflow@Corp.local>"\n')
    assert default_recipient(cfg.transports["mail"]) == "nomaflow@corp.local"


def test_listen_port_0_is_accepted(tree):
    cfg = load(tree, daemon='web_listen = "127.0.0.1:0"\nmetrics_listen = "[::1]:0"')
    assert cfg.web_listen == ("127.0.0.1", 0) and cfg.metrics_listen == ("::1", 0)


@pytest.mark.parametrize("value", ["127.0.0.1:65536", "127.0.0.1:\u00b2", "127.0.0.1:", ":80"])
def test_a_bad_listen_address_is_refused(tree, value):
    with pytest.raises(ConfigError, match=r"daemon\.web_listen must be HOST:PORT"):
        load(tree, daemon=f'web_listen = "{value}"')


def test_the_defaults_readme_names(tree):
    """README's defaults: replica_id the host name, rescan every 2 s, 183 days of history,
    fallback after 3 failures; pacing Slack 60/20, email 120/20, webhook unlimited (a
    burst as large as a rate given), digests after 10 s."""
    import socket

    cfg = load(tree, tree.slack("slack", "https://hooks.slack.test/x")
               + tree.webhook("hook", "https://hook.test/")
               + tree.webhook("paced", "https://hook.test/", "rate_per_minute = 30")
               + '[transports.mail]\ntype = "email"\nhost = "127.0.0.1"\nport = 25\n'
                 'default_from = "nomaflow@corp.test"\n')
    assert (cfg.replica_id, cfg.rescan_seconds, cfg.retention_days) == (
        socket.gethostname(), 2.0, 183)
    assert cfg.fallback_after_failures == 3
    paced = {name: (t.settings["rate_per_minute"], t.settings["burst"],
                    t.settings["digest_after_seconds"]) for name, t in cfg.transports.items()}
    assert paced == {"slack": (60, 20, 10), "hook": (None, None, 10), "paced": (30, 30, 10),
                     "mail": (120, 20, 10)}


EMAIL = "[transports.x]\ntype = 'email'\nport = 25\ndefault_from = 'a@b.c'\n"


@pytest.mark.parametrize(("body", "daemon", "message"), [
    # bounds: a value past them failed later, at 03:00 (OverflowError in a timer, a lease,
    # the prune; alerts waiting forever for a token)
    ("", "send_timeout_seconds = 1e10", "daemon.send_timeout_seconds must be at most 300"),
    ("", "poll_seconds = 1e12", "daemon.poll_seconds must be at most 86400"),
    ("", "rescan_seconds = 1e10", "daemon.rescan_seconds must be at most 3600"),
    ("", "retention_days = 1000000000", "daemon.retention_days must be at most 36500"),
    ("", "fallback_after_failures = 10000000",
     "daemon.fallback_after_failures must be at most 1000"),
    ("[transports.x]\ntype = 'slack'\nwebhook_url = 'ENC(https://hooks.slack.test/x)'\n"
     "rate_per_minute = 1e-300\n", "", "transports.x.rate_per_minute must be at least 0.1"),
    ("[transports.x]\ntype = 'slack'\nwebhook_url = 'ENC(https://hooks.slack.test/x)'\n"
     "digest_after_seconds = 1e9\n", "", "transports.x.digest_after_seconds must be at most"),
    # secrets in a refused value are not repeated
    ("", "database = 'postgressql://nomaflowd:SECRETPASSWD@db.corp/x'",
     "daemon.database must be sqlite:///PATH or postgresql://user@host/db"),
    ("", "base_url = 'https://admin:SECRETPASSWD@liberty.corp.local/x'",
     "daemon.base_url must not hold a user or password"),
    ("", "base_url = 'liberty.corp.local/x'", "daemon.base_url must be an http(s) URL"),
    ("[[routing]]\ntag = 'x'\nrecipients = ['https://hooks.slack.com/services/T/B/SECRETPATH']\n",
     "", "routing[0].recipients holds a URL"),
    (EMAIL + "host = 'smtp://u:SECRETPASSWD@127.0.0.1'\n", "",
     "transports.x.host must be a host name or an IP address"),
    (EMAIL + "host = ''\n", "", "transports.x.host must be a host name or an IP address"),
    ("[transports.x]\ntype = 'webhook'\nurl = 'ENC(ftp://files.corp/SECRETPATH)'\n", "",
     "transports.x.url must be an http(s) URL with a host"),
    ("[transports.x]\ntype = 'webhook'\nurl = 'ENC(https://hook.corp:99999/SECRETPATH)'\n", "",
     "transports.x.url must be an http(s) URL with a host"),
    ("[transports.x]\ntype = 'slack'\nwebhook_url = 'ENC(hooks.slack.com/SECRETPATH)'\n", "",
     "transports.x.webhook_url must be an http(s) URL with a host"),
    ("[transports.x]\ntype = 'slack'\nbot_token = 'ENC(xoxb-1)'\napi_url = 'https://'\n", "",
     "transports.x.api_url must be an http(s) URL"),
    ("[transports.x]\ntype = 'slack'\nbot_token = 'ENC(xoxb-1)'\n"
     "api_url = 'https://admin:SECRETPASSWD@slack.corp/api'\n", "",
     "transports.x.api_url must not hold a user or password"),
    ("", "web_listen = '0.0.0.0:0'\nweb_password = 'ENC( )'",
     "daemon.web_password must not be empty"),
    ("", "spool_dir = ''", "daemon.spool_dir must name a directory"),
    ("", 'spool_dir = "a\\u0000b"', "daemon.spool_dir must name a directory"),
])
def test_a_value_that_would_fail_later_is_refused_at_load(tree, body, daemon, message):
    """A bad config is refused at start in one line naming the key, never repeating a
    secret it holds; these used to load, then fail every send or crash a timer."""
    body = re.sub(r"ENC\((.*?)\)", lambda m: tree.enc(m[1]), body)
    daemon = re.sub(r"ENC\((.*?)\)", lambda m: tree.enc(m[1]), daemon)
    with pytest.raises(ConfigError) as info:
        load(tree, body, daemon)
    said = str(info.value)
    assert message in said and "\n" not in said
    assert "SECRET" not in said


@pytest.mark.parametrize(("jobs", "message"), [
    (b"[jobs.a.alerts]\non_long_run_minutes = nan\n",
     "jobs.a.alerts.on_long_run_minutes must be a number of minutes above 0"),
    (b"[defaults.alerts]\non_long_run_minutes = inf\n", "on_long_run_minutes must be"),
    (b"[jobs.a.alerts]\non_long_run_minutes = 1e308\n", "on_long_run_minutes must be"),
    (b'[jobs.a]\nschedule = "@every 99999999d"\n', "the interval must be at most 366d"),
    (b'[jobs.a]\nschedule = "@every 99999999999999999999d"\n',
     "the interval must be at most 366d"),
    (b'[jobs.caf\xe9]\ntags = ["a"]\n', "is not UTF-8 text (byte 9); save it as UTF-8"),
    (b'\xef\xbb\xbf[jobs.a]\ntags = ["a"]\n', "starts with a byte order mark; save it as UTF-8"
     " without one"),
])
def test_a_bad_jobs_toml_is_refused_naming_the_key(tree, jobs, message):
    """These loaded (nan: every RUNNING event of the job was then quarantined) or failed
    with an internal error; check and run now refuse them in one line."""
    from nomaflowd import catalogue

    tree.jobs_path.write_bytes(jobs)
    with pytest.raises(ConfigError) as info:
        catalogue.load(tree.jobs_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_config_with_a_byte_order_mark_is_refused_saying_so(tree):
    tree.write_config()
    tree.config_path.write_bytes(b"\xef\xbb\xbf" + tree.config_path.read_bytes())
    with pytest.raises(ConfigError, match="starts with a byte order mark"):
        config.load(tree.config_path)


@pytest.mark.parametrize("database", ["postgresql://nomaflowd:SECRETPW@127.0.0.1:1/test",
                                      "sqlite:///."])
@pytest.mark.parametrize("command", ["run", "audit"])
def test_a_database_that_cannot_be_opened_is_one_line_naming_the_key(tree, capsys, database,
                                                                     command):
    """No internal error: the key, why, and never the password."""
    tree.write_config(daemon=f'database = "{database}"')
    tree.spool.mkdir(parents=True, exist_ok=True)
    assert main([command, "--config", str(tree.config_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nomaflowd: daemon.database cannot be opened") and err.count("\n") == 1
    assert "internal error" not in err and "SECRETPW" not in err


def test_a_spool_dir_that_is_a_file_is_refused_at_start_in_one_line(tree, capsys):
    tree.spool.parent.mkdir(parents=True, exist_ok=True)
    tree.spool.write_text("a file, not the spool")
    tree.write_config()
    assert main(["run", "--config", str(tree.config_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nomaflowd: daemon.spool_dir ") and err.count("\n") == 1, err
    assert "not a directory" in err.lower() or "exists" in err.lower(), err


@pytest.mark.parametrize("name", ['"a\\nb"', '""', '"#ops"', '"@alice"', '"a:b"', '"two words"'])
def test_a_transport_name_that_routing_cannot_tell_apart_is_refused(tree, name):
    """A name is written in recipients (`name`, `name:#channel`) and shown in one-line
    tables and logs: no control character, space or colon, not a #channel or an @user."""
    with pytest.raises(ConfigError, match=r"transports\..* is not a usable transport name"):
        load(tree, f"[transports.{name}]\ntype = 'webhook'\nurl = '{tree.enc('https://h.corp/x')}'\n")



@pytest.mark.parametrize("password", ["se/cretCANARY", "se?cretCANARY", "se#cretCANARY"])
@pytest.mark.parametrize("command", ["run", "audit", "check"])
def test_a_database_url_with_an_unencoded_password_is_a_config_error_not_shown(
        tree, capsys, monkeypatch, password, command):
    monkeypatch.setenv("NOMAFLOWD_DEBUG", "1")  # no traceback shows it either
    tree.write_config(daemon=f'database = "postgresql://postgres:{password}@127.0.0.1:5432/test"')
    tree.spool.mkdir(parents=True, exist_ok=True)
    # check lists what it found (exit 1); the others refuse to start (exit 2).
    assert main([command, "--config", str(tree.config_path)]) == (1 if command == "check" else 2)
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert err.count("\n") == 1, err
    assert "daemon.database is not a valid URL; percent-encode the special characters" in err
    assert "cretCANARY" not in err and "se/" not in err and "se?" not in err


@pytest.mark.parametrize("command", [["emit", "--job", "j", "--run", "r", "--state", "FAILED"],
                                     ["audit"],
                                     ["prune"]])
def test_commands_without_the_key_read_a_config_with_an_encrypted_proxy(tree, capsys, command):
    """Runners' emit, audit and prune read the config without decrypting its secrets."""
    proxy = tree.enc("http://user:s3cretCANARY@127.0.0.1:3128")
    tree.write_config(tree.webhook("hook", "http://127.0.0.1:9/x", f'proxy = "{proxy}"'))
    tree.spool.mkdir(parents=True, exist_ok=True)
    tree.key.unlink()  # a runner's host has no key
    assert main([*command, "--config", str(tree.config_path)]) == 0, capsys.readouterr().err
    assert "s3cretCANARY" not in capsys.readouterr().out


@pytest.mark.parametrize("key", ["poll_seconds", "rescan_seconds"])
def test_a_timer_below_a_tenth_of_a_second_is_refused(tree, key):
    with pytest.raises(ConfigError, match=f"daemon.{key} must be at least 0.1$"):
        load(tree, daemon=f"{key} = 0.001")


def test_rotate_names_the_line_of_a_token_it_cannot_decrypt_and_rotates_a_proxy(tree, capsys,
                                                                                tmp_path):
    other = tmp_path / "other.key"
    crypto.write_key(other)
    stale = crypto.encrypt(crypto.load_keys(other), "old")
    proxy = tree.enc("http://u:pw@proxy.corp.local:3128")
    tree.write_config(tree.webhook("h", "https://hooks.example/x", f'proxy = "{proxy}"')
                      + f"# was: {stale}\n")
    before = tree.config_path.read_text()
    line = before[:before.index(stale)].count("\n") + 1
    assert main(["secret", "rotate", "--config", str(tree.config_path)]) == 2
    assert capsys.readouterr().err == (
        f"nomaflowd: {tree.config_path}, line {line}: an enc: token (in a comment too) cannot"
        f" be decrypted with {tree.key}; re-encrypt or remove it; nothing was changed\n")
    assert tree.config_path.read_text() == before
    tree.config_path.write_text(before.replace(f"# was: {stale}\n", ""))
    assert main(["secret", "rotate", "--config", str(tree.config_path)]) == 0
    cfg = config.load(tree.config_path)
    assert cfg.transports["h"].settings["proxy"].reveal() == "http://u:pw@proxy.corp.local:3128"


def test_check_warns_about_a_database_password_in_the_url(tree, capsys):
    tree.write_config(tree.webhook("h", "https://hooks.example/x"),
                      daemon='database = "postgresql://nomaflowd:S3CRET@127.0.0.1:1/x"')
    main(["check", "--config", str(tree.config_path)])
    out = capsys.readouterr().out
    assert "warning: daemon.database holds a password in plaintext" in out
    assert "S3CRET" not in out

"""Set up and run the test OpenID Connect provider:

    python -m tests.oidc_provider.serve --port 8123 --dir /tmp/idp --client-id citadel \
        --client-secret s3cret --redirect-uri http://testserver/sso/callback --user carol:pw:ml-team,auditors

Makes an RSA signing key, migrates a fresh SQLite database, creates the users (with their groups)
and a confidential authorization-code client whose ID tokens are RS256-signed, then serves with
gunicorn until killed. The issuer is http://<host>:<port>/o (host 127.0.0.1 unless --host).
"""

import argparse
import os
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", required=True)
    parser.add_argument("--redirect-uri", action="append", required=True)
    parser.add_argument("--user", action="append", default=[], help="name:password:group,group")
    parser.add_argument("--host", default="127.0.0.1",
                        help="The issuer's host name; a browser test uses localhost so that the provider's cookies "
                             "and Citadel's (on 127.0.0.1) do not overwrite each other (cookies ignore ports).")
    args = parser.parse_args()

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "signing-key.pem"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    issuer = f"http://{args.host}:{args.port}/o"
    os.environ.update(DJANGO_SETTINGS_MODULE="tests.oidc_provider.settings", OIDC_PROVIDER_DB=str(folder / "idp.db"),
                      OIDC_PROVIDER_KEY_FILE=str(key_file), OIDC_PROVIDER_ISSUER=issuer)

    import django

    django.setup()
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from oauth2_provider.models import Application

    call_command("migrate", verbosity=0)
    for spec in args.user:
        name, password, groups = (spec.split(":") + [""])[:3]
        user = User.objects.create_user(name, email=f"{name}@example.org", password=password)
        for group in filter(None, groups.split(",")):
            user.groups.add(Group.objects.get_or_create(name=group)[0])
    Application.objects.create(
        name="citadel", client_id=args.client_id, client_secret=args.client_secret,
        client_type=Application.CLIENT_CONFIDENTIAL, authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
        redirect_uris=" ".join(args.redirect_uri), algorithm=Application.RS256_ALGORITHM, skip_authorization=True)
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "tests.oidc_provider.wsgi:application",
                              f"--bind=127.0.0.1:{args.port}", "--workers=1", "--threads=4"])


if __name__ == "__main__":
    main()

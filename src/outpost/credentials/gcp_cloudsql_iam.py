"""``gcp-cloudsql-iam`` — an OAuth access token from Google's credentials, used as the password
of a Cloud SQL IAM database user.

The token comes from ``credentials.gcp.credentials_file`` or Application Default Credentials
with the ``sqlservice.login`` scope (a token good for logging in to Cloud SQL and nothing
else). Its expiry is the credential's ``expires_at``, so the cache fetches again
``credentials.refresh_margin`` seconds before it runs out; the source refreshes the Google
credentials when their token has no more than that margin left.
"""

from __future__ import annotations

import time
from typing import Any

from outpost.config import CredentialsConfig
from outpost.credentials.base import Clock, Credential, CredentialContext, CredentialSource
from outpost.credentials.gcp_secretmanager import GoogleAuth

#: the scope Cloud SQL's IAM database login accepts (what Google's Cloud SQL connectors ask for)
SQL_LOGIN_SCOPE = "https://www.googleapis.com/auth/sqlservice.login"


class CloudSQLIAMSource(CredentialSource):
    kind = "gcp-cloudsql-iam"
    takes_argument = False
    extra = "gcp"

    def __init__(
        self,
        argument: str,
        config: CredentialsConfig,
        clock: Clock = time.time,
        *,
        credentials: Any = None,
    ) -> None:
        super().__init__(argument, config, clock)
        self.auth = GoogleAuth(self, [SQL_LOGIN_SCOPE], credentials)

    def fetch(self, ctx: CredentialContext) -> Credential:
        token = self.auth.token(ctx, self.config.refresh_margin)
        return Credential(
            password=token.token, fetched_at=self.clock(), expires_at=token.expires_at
        )

// A certified OpenID Provider (npm's oidc-provider) for the OIDC e2e test: one client,
// accounts whose claims come from the login name (`ann` → ann@example.com, groups by
// name), and its built-in development login and consent pages, which the test drives.
//
//   node provider.mjs REDIRECT_URI CLIENT_SECRET --ready-file PATH
//
// Listens on 127.0.0.1 on a port the OS picks and writes {"issuer": URL} to PATH.
import http from 'node:http';
import fs from 'node:fs';
import Provider from 'oidc-provider';

const args = process.argv.slice(2);
const [redirectUri, clientSecret] = args;
const readyFile = args[args.indexOf('--ready-file') + 1];
const groups = { ann: ['dev'], bob: ['ops'] };

const server = http.createServer();
server.listen(0, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: [{
      client_id: 'portway',
      client_secret: clientSecret,
      redirect_uris: [redirectUri],
      grant_types: ['authorization_code'],
      response_types: ['code'],
    }],
    claims: { openid: ['sub'], email: ['email', 'email_verified'], groups: ['groups'] },
    scopes: ['openid', 'email', 'groups', 'offline_access'],
    pkce: { required: () => true },
    async findAccount(ctx, id) {
      return {
        accountId: id,
        async claims() {
          return { sub: id, email: `${id}@example.com`, email_verified: true, groups: groups[id] ?? [] };
        },
      };
    },
  });
  for (const e of ['server_error', 'grant.error', 'authorization.error']) {
    provider.on(e, (ctx, err) => console.error(e, err.message, err.error_detail ?? ''));
  }
  server.on('request', provider.callback());
  fs.writeFileSync(readyFile, JSON.stringify({ issuer }));
});

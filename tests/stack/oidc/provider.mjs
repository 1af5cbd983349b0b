// A real OAuth2 / OpenID provider for the bridge's authentication tests: the certified
// `oidc-provider` package, configured for the client credentials grant with client_secret_basic
// and private_key_jwt client authentication (RS384 / ES384 assertions, as SMART Backend Services
// use), token introspection (the FHIR test server checks tokens with it) and revocation.
//
// For browser logins it also has a plain login form (users from the config) and plays an EHR's
// SMART authorization server: it serves a smart-configuration (at /.well-known/ and
// /fhir/.well-known/, so http://127.0.0.1:PORT/fhir can be a launch `iss`), keeps the `launch`
// and `aud` parameters, and answers a launch's token request with the `patient` in context.
//
// Env: PORT (the issuer is http://127.0.0.1:PORT), OIDC_CONFIG (a JSON file written by the
// launcher, tests/stack/oidc.py): { "clients": [client metadata...], "scopes": [...],
// "ttl": { "<client_id>": seconds }, "users": { "<login>": { "password": ..., "fhirUser": ... } },
// "launches": { "<launch value>": "<Patient id>" }, "resource": {...} }. Tokens and replay records
// live in memory. With "resource": { "audience": "...", "scopes": "..." }, access tokens are JWTs
// for that audience (as a SMART app's tokens for the bridge) carrying `scope`, `client_id` and, for
// the clients in "patients": { "<client_id>": "<Patient id>" }, the `patient` in context; the clients
// in "scopeLists": ["<client_id>"] get `scope` as a JSON list instead of a string.
// Admin endpoints (not OAuth): GET /__admin/health, GET /__admin/stats, POST /__admin/reset-stats.
// OIDC_PARENT_PID makes the provider exit when that process is gone.

import http from 'node:http';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import Provider, { errors } from 'oidc-provider';

const port = Number(process.env.PORT);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error(`set PORT to a free port (got ${process.env.PORT})`);
  process.exit(2);
}
const config = JSON.parse(readFileSync(process.env.OIDC_CONFIG, 'utf8'));
const issuer = `http://127.0.0.1:${port}`;

// The provider's own signing key, made fresh for each run.
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256', kid: 'test-provider' };

const users = config.users ?? {};
const launches = config.launches ?? {};
const patientOfGrant = new Map(); // grant id -> the launch's patient

const newStats = () => ({ token_requests: 0, tokens_issued: 0, token_errors: 0, introspections: 0, by_client: {} });
let stats = newStats();

const provider = new Provider(issuer, {
  clients: config.clients,
  jwks: { keys: [signingKey] },
  scopes: config.scopes ?? [],
  claims: { openid: ['sub'], profile: ['name'], fhirUser: ['fhirUser'] },
  extraParams: ['launch', 'aud'],
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
  enabledJWA: { clientAuthSigningAlgValues: ['RS256', 'RS384', 'ES256', 'ES384'] },
  features: {
    clientCredentials: { enabled: true },
    // Only the resource server (the FHIR test server's client) may introspect tokens.
    introspection: { enabled: true, allowedPolicy: async (ctx, client) => client.clientId === config.introspector },
    revocation: { enabled: true },
    devInteractions: { enabled: false },
    ...(config.resource
      ? {
          resourceIndicators: {
            enabled: true,
            defaultResource: async () => config.resource.audience,
            useGrantedResource: async () => true,
            getResourceServerInfo: async (ctx, indicator) => {
              if (indicator !== config.resource.audience) throw new errors.InvalidTarget();
              return {
                scope: config.resource.scopes,
                audience: indicator,
                accessTokenFormat: 'jwt',
                jwt: { sign: { alg: 'RS256' } },
              };
            },
          },
        }
      : {}),
  },
  // the SMART launch context of a token: the one patient its client acts for, signed as given (a
  // test may give an empty string, a number or a list, to see the bridge refuse it)
  async extraTokenClaims(ctx, token) {
    const patients = config.patients ?? {};
    return Object.hasOwn(patients, token.clientId) ? { patient: patients[token.clientId] } : undefined;
  },
  // the clients in "scopeLists" get their access tokens' scope as a JSON list (SMART says a string)
  formats: {
    customizers: {
      async jwt(ctx, token, jwt) {
        if ((config.scopeLists ?? []).includes(token.clientId) && typeof jwt.payload.scope === 'string') {
          jwt.payload.scope = jwt.payload.scope.split(' ');
        }
      },
    },
  },
  ttl: {
    ClientCredentials: (ctx, token, client) => config.ttl?.[client.clientId] ?? 600,
  },
  cookies: { keys: [randomBytes(16).toString('hex')] },
  async findAccount(ctx, id) {
    const user = Object.hasOwn(users, id) ? users[id] : undefined;
    if (!user) return undefined;
    return { accountId: id, claims: async () => ({ sub: id, name: id, fhirUser: user.fhirUser }) };
  },
});

provider.on('grant.success', (ctx) => {
  stats.tokens_issued += 1;
  const id = ctx.oidc.client?.clientId ?? '?';
  stats.by_client[id] = (stats.by_client[id] ?? 0) + 1;
});
provider.on('grant.error', (ctx, err) => {
  stats.token_errors += 1;
  console.error(`token request refused: ${err.error}: ${err.error_description ?? ''} ${err.error_detail ?? ''}`);
});

provider.use(async (ctx, next) => {
  if (ctx.path === '/__admin/health') {
    ctx.body = { status: 'ok' };
    return;
  }
  if (ctx.path === '/__admin/stats') {
    ctx.body = stats;
    return;
  }
  if (ctx.path === '/__admin/reset-stats' && ctx.method === 'POST') {
    stats = newStats();
    ctx.body = { status: 'ok' };
    return;
  }
  if (ctx.path === '/.well-known/smart-configuration' || ctx.path === '/fhir/.well-known/smart-configuration') {
    ctx.body = smartConfiguration();
    return;
  }
  if (ctx.path.startsWith('/interaction/')) {
    await interaction(ctx);
    return;
  }
  if (ctx.path === '/token' && ctx.method === 'POST') stats.token_requests += 1;
  if (ctx.path === '/token/introspection') stats.introspections += 1;
  await next();
  // SMART: the token answer of a launch names the patient in context
  if (ctx.path === '/token' && ctx.status === 200 && typeof ctx.body?.access_token === 'string') {
    const token = await provider.AccessToken.find(ctx.body.access_token);
    const patient = token ? patientOfGrant.get(token.grantId) : undefined;
    if (patient) ctx.body = { ...ctx.body, patient };
  }
});

function smartConfiguration() {
  return {
    issuer,
    authorization_endpoint: `${issuer}/auth`,
    token_endpoint: `${issuer}/token`,
    jwks_uri: `${issuer}/jwks`,
    grant_types_supported: ['authorization_code'],
    code_challenge_methods_supported: ['S256'],
    scopes_supported: config.scopes ?? [],
    capabilities: ['launch-ehr', 'client-confidential-symmetric', 'sso-openid-connect', 'context-ehr-patient'],
  };
}

const escape = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function loginForm(uid, message) {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in</title></head><body>
<h1>Sign in</h1>${message ? `<p class="error">${escape(message)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}">
<label>User <input name="username" autocomplete="username" autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password"></label>
<button type="submit">Sign in</button></form></body></html>`;
}

async function readForm(req) {
  let text = '';
  for await (const chunk of req) {
    text += chunk;
    if (text.length > 10000) break;
  }
  return new URLSearchParams(text);
}

// The login form: a user from the config signs in and grants what the client asked for.
async function interaction(ctx) {
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  if (ctx.method === 'GET') {
    ctx.type = 'html';
    ctx.body = loginForm(details.uid, '');
    return;
  }
  const form = await readForm(ctx.req);
  const login = form.get('username') ?? '';
  const user = Object.hasOwn(users, login) ? users[login] : undefined;
  if (!user || user.password !== form.get('password')) {
    ctx.status = 200;
    ctx.type = 'html';
    ctx.body = loginForm(details.uid, 'Unknown user or wrong password.');
    return;
  }
  const { params } = details;
  let result;
  if (params.launch !== undefined && !Object.hasOwn(launches, params.launch)) {
    result = { error: 'access_denied', error_description: 'unknown launch' };
  } else {
    const grant = new provider.Grant({ accountId: login, clientId: params.client_id });
    grant.addOIDCScope(params.scope);
    grant.addOIDCClaims(['fhirUser', 'name']);
    const grantId = await grant.save();
    if (params.launch !== undefined) patientOfGrant.set(grantId, launches[params.launch]);
    result = { login: { accountId: login }, consent: { grantId } };
  }
  const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: false });
  ctx.status = 303;
  ctx.set('Location', returnTo);
  ctx.body = '';
}


const server = http.createServer(provider.callback());
server.listen(port, '127.0.0.1', () => {
  console.log(`OpenID provider on ${issuer}`);
});
const stop = () => {
  server.close();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
const parent = Number(process.env.OIDC_PARENT_PID);
if (parent > 0) {
  setInterval(() => {
    try {
      process.kill(parent, 0);
    } catch {
      stop();
    }
  }, 1000).unref();
}

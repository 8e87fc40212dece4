import { expect } from 'chai';
import { JwksFetchError, createJwksFetcher } from '../../tenants/index.ts';
import { startJwksServer } from '../helpers/test-issuer.ts';
import type { JwksServer } from '../helpers/test-issuer.ts';

const JWKS = { keys: [{ kty: 'EC', kid: 'k1', crv: 'P-256', x: 'x', y: 'y' }] };

async function failure(promise: Promise<unknown>): Promise<JwksFetchError> {
  try {
    await promise;
  } catch (err) {
    expect(err).to.be.instanceOf(JwksFetchError);
    return err as JwksFetchError;
  }
  throw new Error('expected a JwksFetchError');
}

describe('tenants/ createJwksFetcher', () => {
  let server: JwksServer;
  let nowMs: number;
  const now = (): Date => new Date(nowMs);

  beforeEach(async () => {
    nowMs = Date.parse('2025-06-01T12:00:00Z');
    server = await startJwksServer(JWKS);
  });

  afterEach(async () => {
    await server.close();
  });

  it('fetches a JWK Set and serves it from cache until cacheSeconds pass', async () => {
    const f = createJwksFetcher({ now, cacheSeconds: 300 });
    expect(await f.get(server.url())).to.deep.equal(JWKS);
    expect(await f.get(server.url())).to.deep.equal(JWKS);
    expect(server.count()).to.equal(1);
    nowMs += 301_000;
    await f.get(server.url());
    expect(server.count()).to.equal(2);
  });

  it('peeks at a fresh cached set without a request, and at nothing else', async () => {
    const f = createJwksFetcher({ now, cacheSeconds: 300 });
    expect(f.peek(server.url())).to.equal(undefined);
    expect(server.count()).to.equal(0);
    await f.get(server.url());
    expect(f.peek(server.url())).to.deep.equal(JWKS);
    nowMs += 301_000;
    expect(f.peek(server.url())).to.equal(undefined);
    expect(server.count()).to.equal(1);
  });

  it('honours forceRefresh only outside the cooldown', async () => {
    const f = createJwksFetcher({ now, minRefetchSeconds: 30 });
    await f.get(server.url());
    await f.get(server.url(), { forceRefresh: true });
    await f.get(server.url(), { forceRefresh: true });
    expect(server.count()).to.equal(1);
    nowMs += 30_000;
    const next = { keys: [...JWKS.keys, { kty: 'EC', kid: 'k2', crv: 'P-256', x: 'x', y: 'y' }] };
    server.setJwks(next);
    expect(await f.get(server.url(), { forceRefresh: true })).to.deep.equal(next);
    expect(server.count()).to.equal(2);
  });

  it('shares one request between concurrent callers', async () => {
    const f = createJwksFetcher({ now });
    await Promise.all([f.get(server.url()), f.get(server.url()), f.get(server.url())]);
    expect(server.count()).to.equal(1);
  });

  it('times out a server that never answers', async () => {
    server.setHandler(() => {
      /* never respond */
    });
    const f = createJwksFetcher({ now, timeoutMs: 200 });
    const started = Date.now();
    const err = await failure(f.get(server.url()));
    expect(err.message).to.include('timeout');
    expect(Date.now() - started).to.be.lessThan(2000);
  });

  it('times out a body that trickles in', async () => {
    server.setHandler((_req, res) => {
      res.type('application/json');
      res.write('{"keys":[');
      // ...and never finish
    });
    const f = createJwksFetcher({ now, timeoutMs: 200 });
    expect((await failure(f.get(server.url()))).message).to.include('timeout');
  });

  it('caps the body size while streaming (no content-length)', async () => {
    server.setHandler((_req, res) => {
      res.type('application/json');
      const chunk = 'x'.repeat(16 * 1024);
      for (let i = 0; i < 8; i++) {
        res.write(chunk);
      }
      res.end();
    });
    const f = createJwksFetcher({ now, maxBytes: 64 * 1024 });
    expect((await failure(f.get(server.url()))).message).to.include('too large');
  });

  it('refuses a declared content-length over the cap', async () => {
    server.setHandler((_req, res) => {
      res.type('application/json').send(JSON.stringify({ keys: [], pad: 'x'.repeat(70 * 1024) }));
    });
    const f = createJwksFetcher({ now });
    expect((await failure(f.get(server.url()))).message).to.include('too large');
  });

  it('does not follow redirects', async () => {
    server.setHandler((req, res) => {
      if (req.path === '/jwks') {
        res.redirect(302, '/elsewhere');
      } else {
        res.json(JWKS);
      }
    });
    const f = createJwksFetcher({ now });
    expect((await failure(f.get(server.url()))).message).to.include('redirect');
    expect(server.count('/elsewhere')).to.equal(0);
  });

  for (const [name, status, body] of [
    ['an HTTP error', 500, '{"keys":[]}'],
    ['a body that is not JSON', 200, '<html>'],
    ['JSON without a keys array', 200, '{"keys":"nope"}'],
  ] as const) {
    it(`refuses ${name}`, async () => {
      server.setHandler((_req, res) => {
        res.status(status).type('application/json').send(body);
      });
      await failure(createJwksFetcher({ now }).get(server.url()));
    });
  }

  it('remembers a failure for the cooldown (no hammering a broken URL)', async () => {
    server.setHandler((_req, res) => {
      res.status(503).end();
    });
    const f = createJwksFetcher({ now, minRefetchSeconds: 30 });
    await failure(f.get(server.url()));
    await failure(f.get(server.url()));
    expect(server.count()).to.equal(1);
    nowMs += 31_000;
    server.setHandler(undefined);
    expect(await f.get(server.url())).to.deep.equal(JWKS);
    expect(server.count()).to.equal(2);
  });

  it('keeps serving a fresh cached set when a forced refresh fails', async () => {
    const f = createJwksFetcher({ now, minRefetchSeconds: 30 });
    await f.get(server.url());
    server.setHandler((_req, res) => {
      res.status(500).end();
    });
    nowMs += 31_000;
    expect(await f.get(server.url(), { forceRefresh: true })).to.deep.equal(JWKS);
    expect(server.count()).to.equal(2);
  });

  it('refuses URLs that are not https (http only to loopback) without fetching', async () => {
    let calls = 0;
    const fetchImpl = (() => {
      calls++;
      return Promise.resolve(new Response('{"keys":[]}'));
    }) as typeof fetch;
    const f = createJwksFetcher({ now, fetchImpl });
    for (const url of [
      'http://example.org/jwks',
      'file:///etc/passwd',
      'https://user:pw@example.org/jwks',
      'not a url',
    ]) {
      await failure(f.get(url));
    }
    expect(calls).to.equal(0);
  });
});

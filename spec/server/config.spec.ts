import { expect } from 'chai';
import { ConfigError, loadConfig } from '../../server/config.ts';
import { runCli } from '../helpers/processes.ts';

describe('configuration', () => {
  it('has embedded defaults', () => {
    const c = loadConfig({});
    expect(c.port).to.equal(8080);
    expect(c.publicUrl).to.equal('http://localhost:8080');
    expect(c.jwtAlgorithms).to.deep.equal(['ES384', 'RS384', 'ES256', 'RS256']);
    expect(c.corsOrigins).to.equal('*');
    expect(c.adminToken).to.equal(undefined);
    expect(Object.isFrozen(c)).to.equal(true);
  });

  it('names CELLCDS_ variables it does not know (a typo is otherwise silently ignored), with a guess', () => {
    const c = loadConfig({
      CELLCDS_PORT: '18722',
      CELLCDS_EVAL_BUDGET: '900',
      CELLCDS_DATA_DIR: './var',
      CELLCDS_TEST_PG_URL: 'postgres://x', // the specs' own
      CELLCDS_FOO: '1',
      HOME: '/root',
    });
    expect(c.unknownSettings).to.deep.equal([
      { name: 'CELLCDS_EVAL_BUDGET', suggestion: 'CELLCDS_EVAL_BUDGET_MS' },
      { name: 'CELLCDS_FOO' },
      { name: 'CELLCDS_PORT', suggestion: 'PORT' },
    ]);
    expect(loadConfig({ CELLCDS_DATA_DIR: './var' }).unknownSettings).to.deep.equal([]);
  });

  it('warns about them on the CLI, once, on stderr', function () {
    this.timeout(60_000);
    const r = runCli(['regions'], {
      ...process.env,
      CELLCDS_PORT: '18722',
      CELLCDS_LOG_LEVEL: 'silent',
    });
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stderr).to.equal(
      'warning: CELLCDS_PORT is not a cellcds setting and is ignored (did you mean PORT?)\n',
    );
  });

  it('sizes the replay cache: 100,000 in process, 1,000,000 in Redis by default, or as set', () => {
    expect(loadConfig({}).replayCacheMaxEntries).to.equal(100_000);
    expect(
      loadConfig({ CELLCDS_REPLAY_CACHE_MAX_ENTRIES: '250000' }).replayCacheMaxEntries,
    ).to.equal(250_000);
    const redis = { CELLCDS_REDIS_URL: 'redis://127.0.0.1:6379' };
    expect(loadConfig(redis).replayCacheMaxEntries).to.equal(1_000_000);
    expect(
      loadConfig({ ...redis, CELLCDS_REPLAY_CACHE_MAX_ENTRIES: '5000' }).replayCacheMaxEntries,
    ).to.equal(5000);
  });

  it("sizes one issuer's share of the replay cache: 25,000, at most the cache, or as set", () => {
    expect(loadConfig({}).replayCacheMaxPerIssuer).to.equal(25_000);
    expect(
      loadConfig({ CELLCDS_REDIS_URL: 'redis://127.0.0.1:6379' }).replayCacheMaxPerIssuer,
    ).to.equal(25_000);
    expect(
      loadConfig({ CELLCDS_REPLAY_CACHE_MAX_ENTRIES: '5000' }).replayCacheMaxPerIssuer,
    ).to.equal(5000);
    expect(
      loadConfig({ CELLCDS_REPLAY_CACHE_MAX_PER_ISSUER: '100000' }).replayCacheMaxPerIssuer,
    ).to.equal(100_000);
    for (const redis of [{}, { CELLCDS_REDIS_URL: 'redis://127.0.0.1:6379' }]) {
      expect(() =>
        loadConfig({
          ...redis,
          CELLCDS_REPLAY_CACHE_MAX_ENTRIES: '5000',
          CELLCDS_REPLAY_CACHE_MAX_PER_ISSUER: '6000',
        }),
      ).to.throw(ConfigError, /CELLCDS_REPLAY_CACHE_MAX_PER_ISSUER \(6000\) exceeds/);
    }
    expect(() => loadConfig({ CELLCDS_REPLAY_CACHE_MAX_PER_ISSUER: '0' })).to.throw(
      ConfigError,
      /CELLCDS_REPLAY_CACHE_MAX_PER_ISSUER/,
    );
  });

  it('sets the main-thread evaluation slice: 5 ms by default, 0 turns it off', () => {
    expect(loadConfig({}).evaluation.inlineSliceMs).to.equal(5);
    expect(loadConfig({ CELLCDS_EVAL_INLINE_MS: '0' }).evaluation.inlineSliceMs).to.equal(0);
  });

  it("bounds pack uploads: a validation worker's 20 s and 512 MB, 2 at once, test coverage required; or as set", () => {
    expect(loadConfig({}).packCheck).to.deep.equal({
      timeoutMs: 20_000,
      memoryMb: 512,
      uploadsInFlight: 2,
      requireTestCoverage: true,
    });
    expect(
      loadConfig({
        CELLCDS_PACK_CHECK_TIMEOUT_MS: '5000',
        CELLCDS_PACK_CHECK_MEMORY_MB: '256',
        CELLCDS_PACK_UPLOADS_IN_FLIGHT: '1',
        CELLCDS_PACK_TEST_COVERAGE: 'off',
      }).packCheck,
    ).to.deep.equal({
      timeoutMs: 5000,
      memoryMb: 256,
      uploadsInFlight: 1,
      requireTestCoverage: false,
    });
  });

  it('paces DEK rotations: 200 per emergency batch, a budget of 50 re-seals, 50 ms apart; or as set', () => {
    expect(loadConfig({}).rewrap).to.deep.equal({
      batchSize: 200,
      scheduledBatchSize: 50,
      throttleMs: 50,
    });
    expect(
      loadConfig({
        CELLCDS_REWRAP_BATCH: '500',
        CELLCDS_REWRAP_SCHEDULED_BATCH: '10',
        CELLCDS_REWRAP_THROTTLE_MS: '0',
      }).rewrap,
    ).to.deep.equal({ batchSize: 500, scheduledBatchSize: 10, throttleMs: 0 });
  });

  it("sets a rewrap job's owner lease: 60 s by default, or as set", () => {
    expect(loadConfig({}).jobLeaseMs).to.equal(60_000);
    expect(loadConfig({ CELLCDS_JOB_LEASE_MS: '5000' }).jobLeaseMs).to.equal(5_000);
    expect(loadConfig({ CELLCDS_JOB_LEASE_MS: '3600000' }).jobLeaseMs).to.equal(3_600_000);
  });

  it('normalises the public URL (no trailing slash)', () => {
    expect(loadConfig({ CELLCDS_PUBLIC_URL: 'https://cds.example.org/base/' }).publicUrl).to.equal(
      'https://cds.example.org/base',
    );
  });

  const bad: Array<[string, Record<string, string>, RegExp]> = [
    ['a non-numeric port', { PORT: 'eighty' }, /PORT/],
    ['a port out of range', { PORT: '70000' }, /PORT/],
    ['a relative public URL', { CELLCDS_PUBLIC_URL: 'cds.example.org' }, /CELLCDS_PUBLIC_URL/],
    [
      'a public URL with a query',
      { CELLCDS_PUBLIC_URL: 'https://cds.example.org/?x=1' },
      /CELLCDS_PUBLIC_URL/,
    ],
    ['a short admin token', { CELLCDS_ADMIN_TOKEN: 'short' }, /CELLCDS_ADMIN_TOKEN/],
    [
      'HS256 in the algorithm list',
      { CELLCDS_JWT_ALGORITHMS: 'ES384,HS256' },
      /CELLCDS_JWT_ALGORITHMS/,
    ],
    ['alg none', { CELLCDS_JWT_ALGORITHMS: 'none' }, /CELLCDS_JWT_ALGORITHMS/],
    ['an invalid region id', { CELLCDS_REGION: 'US East' }, /CELLCDS_REGION/],
    ['an unknown log level', { CELLCDS_LOG_LEVEL: 'loud' }, /CELLCDS_LOG_LEVEL/],
    ['a bad CORS origin', { CELLCDS_CORS_ORIGINS: 'not a url' }, /CELLCDS_CORS_ORIGINS/],
    ['a negative evaluation slice', { CELLCDS_EVAL_INLINE_MS: '-1' }, /CELLCDS_EVAL_INLINE_MS/],
    [
      'an evaluation slice over 100 ms',
      { CELLCDS_EVAL_INLINE_MS: '500' },
      /CELLCDS_EVAL_INLINE_MS/,
    ],
    [
      'a pack validation time under 100 ms',
      { CELLCDS_PACK_CHECK_TIMEOUT_MS: '50' },
      /CELLCDS_PACK_CHECK_TIMEOUT_MS/,
    ],
    [
      'a pack validation heap under 16 MB',
      { CELLCDS_PACK_CHECK_MEMORY_MB: '8' },
      /CELLCDS_PACK_CHECK_MEMORY_MB/,
    ],
    [
      'no pack uploads at once',
      { CELLCDS_PACK_UPLOADS_IN_FLIGHT: '0' },
      /CELLCDS_PACK_UPLOADS_IN_FLIGHT/,
    ],
    ['an empty rewrap batch', { CELLCDS_REWRAP_BATCH: '0' }, /CELLCDS_REWRAP_BATCH/],
    [
      'a scheduled rewrap batch over 10,000',
      { CELLCDS_REWRAP_SCHEDULED_BATCH: '20000' },
      /CELLCDS_REWRAP_SCHEDULED_BATCH/,
    ],
    ['a negative rewrap pause', { CELLCDS_REWRAP_THROTTLE_MS: '-5' }, /CELLCDS_REWRAP_THROTTLE_MS/],
    ['a job lease under 5 s', { CELLCDS_JOB_LEASE_MS: '4999' }, /CELLCDS_JOB_LEASE_MS/],
    ['a job lease over an hour', { CELLCDS_JOB_LEASE_MS: '3600001' }, /CELLCDS_JOB_LEASE_MS/],
    [
      'a job lease that is not an integer',
      { CELLCDS_JOB_LEASE_MS: '1.5e4x' },
      /CELLCDS_JOB_LEASE_MS/,
    ],
    [
      'a replay cache too small to be useful',
      { CELLCDS_REPLAY_CACHE_MAX_ENTRIES: '10' },
      /CELLCDS_REPLAY_CACHE_MAX_ENTRIES/,
    ],
    [
      'a replay cache size that is not a number',
      { CELLCDS_REPLAY_CACHE_MAX_ENTRIES: 'lots' },
      /CELLCDS_REPLAY_CACHE_MAX_ENTRIES/,
    ],
  ];
  for (const [name, env, setting] of bad) {
    it(`stops the boot on ${name}, naming the setting`, () => {
      expect(() => loadConfig(env)).to.throw(ConfigError, setting);
    });
  }
});

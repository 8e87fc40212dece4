import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import YAML from 'yaml';
import { ConfigError } from '../../server/config.ts';
import {
  describeRegion,
  formatRegionTable,
  loadRegionMatrix,
  RegionConfigError,
  selectRegion,
} from '../../server/regions.ts';
import { checkFailover } from '../../tenants/index.ts';

type Json = Record<string, unknown>;

function region(id: string, overrides: Json = {}): Json {
  return {
    id,
    jurisdiction: id.startsWith('eu') ? 'EU' : 'US',
    publicUrl: `https://${id}.cellcds.example`,
    storage: { dataDir: `data/${id}` },
    backupDir: `backups/${id}`,
    keyProvider: { kind: 'local-keyring', dir: `keys/${id}` },
    failover: [],
    ...overrides,
  };
}

describe('server/ region matrix', () => {
  let dir: string;
  const defaults = () => ({ dataDir: path.join(dir, 'var'), publicUrl: 'http://localhost:8080' });

  function write(name: string, doc: unknown): string {
    const file = path.join(dir, name);
    fs.writeFileSync(file, name.endsWith('.json') ? JSON.stringify(doc) : YAML.stringify(doc));
    return file;
  }

  function problemsOf(doc: unknown, name = 'regions.yaml'): string[] {
    const file = write(name, doc);
    try {
      loadRegionMatrix(file, defaults());
    } catch (err) {
      expect(err).to.be.instanceOf(RegionConfigError);
      expect(err).to.be.instanceOf(ConfigError);
      expect((err as Error).message).to.include(file);
      return (err as RegionConfigError).problems.map((p) => `${p.path}: ${p.message}`);
    }
    throw new Error('expected the matrix to be refused');
  }

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-'));
  });

  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('without a file, has one embedded region `local` under the data directory', () => {
    const m = loadRegionMatrix(undefined, defaults());
    expect(m.source).to.equal('embedded');
    expect(m.regions).to.have.length(1);
    const local = m.regions[0]!;
    expect(local).to.deep.include({
      id: 'local',
      publicUrl: 'http://localhost:8080',
      storage: { kind: 'sqlite', dataDir: path.join(dir, 'var') },
      failover: [],
    });
    // Tenant stores land in <CELLCDS_DATA_DIR>/local/ (the data plane appends the region id).
    expect(describeRegion(local).data).to.equal(`sqlite ${path.join(dir, 'var', 'local')}/`);
    expect(Object.isFrozen(m) && Object.isFrozen(m.regions) && Object.isFrozen(local)).to.equal(
      true,
    );
  });

  it('loads a YAML matrix, resolving relative paths against the file', () => {
    const file = write('regions.yaml', {
      regions: [
        region('us-east', { failover: ['us-west'] }),
        region('us-west', { failover: ['us-east'] }),
        region('eu-west', {
          storage: { postgresUrl: 'postgres://cellcds:s3cret-pw@db.eu.internal:5432/cellcds' },
        }),
      ],
    });
    const m = loadRegionMatrix(file, defaults());
    expect(m.source).to.equal(file);
    expect(m.regions.map((r) => r.id)).to.deep.equal(['us-east', 'us-west', 'eu-west']);
    expect(m.regions[0]!.storage).to.deep.equal({
      kind: 'sqlite',
      dataDir: path.join(dir, 'data/us-east'),
    });
    expect(m.regions[0]!.backupDir).to.equal(path.join(dir, 'backups/us-east'));
    expect(m.regions[0]!.keyProvider).to.deep.equal({
      kind: 'local-keyring',
      dir: path.join(dir, 'keys/us-east'),
    });
    expect(selectRegion(m, 'eu-west').jurisdiction).to.equal('EU');
    expect(() => selectRegion(m, 'ap-south')).to.throw(RegionConfigError, /no region 'ap-south'/);
  });

  it('loads the same matrix from JSON', () => {
    const file = write('regions.json', { regions: [region('us-east')] });
    expect(loadRegionMatrix(file, defaults()).regions[0]!.id).to.equal('us-east');
  });

  it('is usable as the tenants/ region info (structural RegionInfo)', () => {
    const file = write('regions.yaml', {
      regions: [region('us-east', { failover: ['us-west'] }), region('us-west')],
    });
    const m = loadRegionMatrix(file, defaults());
    const tenant = { region: 'us-east', residency: { dr: { mode: 'jurisdiction' as const } } };
    expect(checkFailover(tenant, 'us-west', m.regions)).to.deep.equal([]);
  });

  const bad: Array<[string, unknown, string[]]> = [
    [
      'a failover target that is not defined',
      { regions: [region('us-east'), region('eu-west', { failover: ['ap-south'] })] },
      ["regions[1].failover[0]: unknown region 'ap-south'"],
    ],
    [
      'a region failing over to itself, and a target listed twice',
      {
        regions: [
          region('us-east', { failover: ['us-east', 'us-west', 'us-west'] }),
          region('us-west'),
        ],
      },
      [
        'regions[0].failover[0]: a region cannot fail over to itself',
        "regions[0].failover[2]: 'us-west' is listed twice",
      ],
    ],
    [
      'a duplicate region id',
      { regions: [region('us-east'), region('us-east', { publicUrl: 'https://other.example' })] },
      ["regions[1].id: region 'us-east' is defined twice"],
    ],
    [
      'two regions sharing a public URL, a backup folder and a database',
      {
        regions: [
          region('us-east', { storage: { postgresUrl: 'postgres://db.example/c' } }),
          region('us-west', {
            publicUrl: 'https://us-east.cellcds.example/',
            backupDir: 'backups/us-east',
            storage: { postgresUrl: 'postgres://db.example/c' },
          }),
        ],
      },
      [
        "regions[1].publicUrl: is also the public URL of region 'us-east'",
        "regions[1].backupDir: is also the backup location of region 'us-east'",
        "regions[1].storage.postgresUrl: is also the database of region 'us-east'",
      ],
    ],
    [
      'both dataDir and postgresUrl',
      {
        regions: [region('us-east', { storage: { dataDir: 'a', postgresUrl: 'postgres://h/d' } })],
      },
      ['regions[0].storage: must have exactly one of dataDir and postgresUrl'],
    ],
    [
      'an unknown key provider kind',
      { regions: [region('us-east', { keyProvider: { kind: 'aws-kms', keyArn: 'arn:x' } })] },
      ["regions[0].keyProvider.kind: must be { kind: 'local-keyring', dir }"],
    ],
    [
      'missing and mistyped fields, an unknown field',
      {
        regions: [
          {
            id: 'US East',
            publicUrl: 'ftp://x.example',
            storage: { dataDir: 'd' },
            backupDir: 7,
            keyProvider: { kind: 'local-keyring', dir: 'k' },
            colour: 'blue',
          },
        ],
      },
      [
        'regions[0].id: must be a lower-case region id such as us-east',
        'regions[0].jurisdiction: is required',
        'regions[0].publicUrl: must be an absolute http(s) URL without query, fragment or credentials',
        'regions[0].backupDir: must be a string',
        'regions[0].colour: is not a known field',
      ],
    ],
    ['no regions at all', { regions: [] }, ['regions: must define at least one region']],
    [
      'a list instead of a mapping',
      [region('us-east')],
      [': must be a mapping with a `regions` list'],
    ],
  ];
  for (const [name, doc, expected] of bad) {
    it(`refuses ${name}, naming each path`, () => {
      expect(problemsOf(doc)).to.deep.equal(expected);
    });
  }

  it('refuses an unreadable file and invalid YAML, naming the file', () => {
    expect(() => loadRegionMatrix(path.join(dir, 'missing.yaml'), defaults())).to.throw(
      RegionConfigError,
      /missing\.yaml: cannot be read \(ENOENT\)/,
    );
    fs.writeFileSync(path.join(dir, 'broken.yaml'), 'regions: [\n  - id: x\n   bad');
    expect(() => loadRegionMatrix(path.join(dir, 'broken.yaml'), defaults())).to.throw(
      RegionConfigError,
      /broken\.yaml: is not valid YAML/,
    );
  });

  it('prints the matrix as a table: data, backups, keys, failover; no database password', () => {
    const file = write('regions.yaml', {
      regions: [
        region('us-east', { failover: ['us-west'] }),
        region('us-west'),
        region('eu-west', {
          storage: { postgresUrl: 'postgres://cellcds:s3cret-pw@db.eu.internal:5432/cellcds' },
        }),
      ],
    });
    const text = formatRegionTable(loadRegionMatrix(file, defaults()));
    const lines = text.split('\n');
    expect(lines[0]).to.equal(`Region matrix (${file}):`);
    expect(lines[1]).to.match(
      /^REGION\s+JURISDICTION\s+DATA HOSTED AT\s+BACKUPS AT\s+KEYS HELD IN\s+FAILOVER TO$/,
    );
    expect(lines).to.have.length(5);
    const cols = (line: string) => line.split(/\s{2,}/);
    expect(cols(lines[2]!)).to.deep.equal([
      'us-east',
      'US',
      `sqlite ${path.join(dir, 'data/us-east', 'us-east')}/`,
      path.join(dir, 'backups/us-east'),
      `local-keyring ${path.join(dir, 'keys/us-east')}`,
      'us-west',
    ]);
    expect(cols(lines[3]!).at(-1)).to.equal('-');
    expect(cols(lines[4]!).slice(0, 3)).to.deep.equal([
      'eu-west',
      'EU',
      'postgres postgres://***@db.eu.internal:5432/cellcds',
    ]);
    expect(text).not.to.include('s3cret-pw');
    // Columns line up: every row starts its second column at the same offset.
    const offsets = lines.slice(1).map((l) => l.indexOf(cols(l)[1]!));
    expect(new Set(offsets).size).to.equal(1);
  });
});

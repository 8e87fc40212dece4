import { expect } from 'chai';
import {
  ADMIN_ACTIONS,
  ForbiddenError,
  authorize,
  authorizeTokenIssue,
} from '../../tenants/index.ts';
import type { AdminAction, Principal, Role } from '../../tenants/index.ts';

const operator: Principal = { tokenId: 'tok_op', role: 'platform-operator' };
const author: Principal = { tokenId: 'tok_ra', role: 'rule-author' };
const adminA: Principal = { tokenId: 'tok_ta', role: 'tenant-admin', tenant: 'tenant-a' };
const auditorA: Principal = { tokenId: 'tok_au', role: 'auditor', tenant: 'tenant-a' };

const ALL_ACTIONS = ADMIN_ACTIONS;

function isAllowed(p: Principal, action: AdminAction, tenant?: string): boolean {
  try {
    authorize(p, action, tenant);
    return true;
  } catch (err) {
    expect(err).to.be.instanceOf(ForbiddenError);
    return false;
  }
}

describe('tenants/ authorize()', () => {
  // [principal, action, tenant, allowed]
  const table: Array<[string, Principal, AdminAction, string | undefined, boolean]> = [
    ['operator creates a tenant', operator, 'tenant:create', undefined, true],
    ['operator reads tenant B', operator, 'tenant:read', 'tenant-b', true],
    ['operator suspends tenant B', operator, 'tenant:update', 'tenant-b', true],
    ['operator sets subscriptions', operator, 'tenant:subscriptions', 'tenant-b', true],
    ['operator issues tokens', operator, 'token:issue', undefined, true],
    ['operator uploads a pack', operator, 'pack:upload', undefined, true],
    ['operator reads all audit', operator, 'audit:read', undefined, true],
    ['operator reads patient records', operator, 'records:read', 'tenant-a', false],
    ['rule author uploads a pack', author, 'pack:upload', undefined, true],
    ['rule author reads packs', author, 'pack:read', undefined, true],
    ['rule author reads a tenant', author, 'tenant:read', 'tenant-a', false],
    ['rule author sets subscriptions', author, 'tenant:subscriptions', 'tenant-a', false],
    ['rule author issues tokens', author, 'token:issue', undefined, false],
    ['rule author reads audit', author, 'audit:read', undefined, false],
    ['tenant-admin of A reads A', adminA, 'tenant:read', 'tenant-a', true],
    ['tenant-admin of A sets A subscriptions', adminA, 'tenant:subscriptions', 'tenant-a', true],
    ['tenant-admin of A issues a token for A', adminA, 'token:issue', 'tenant-a', true],
    ['tenant-admin of A reads A audit', adminA, 'audit:read', 'tenant-a', true],
    ['tenant-admin of A reads A records', adminA, 'records:read', 'tenant-a', true],
    ['tenant-admin of A reads B', adminA, 'tenant:read', 'tenant-b', false],
    ['tenant-admin of A sets B subscriptions', adminA, 'tenant:subscriptions', 'tenant-b', false],
    ['tenant-admin of A issues a token for B', adminA, 'token:issue', 'tenant-b', false],
    ['tenant-admin of A reads B audit', adminA, 'audit:read', 'tenant-b', false],
    ['tenant-admin of A reads B records', adminA, 'records:read', 'tenant-b', false],
    ['tenant-admin of A reads all audit (no tenant)', adminA, 'audit:read', undefined, false],
    ['tenant-admin of A lists all tenants', adminA, 'tenant:list', undefined, false],
    ['tenant-admin of A updates A', adminA, 'tenant:update', 'tenant-a', false],
    ['tenant-admin of A creates a tenant', adminA, 'tenant:create', undefined, false],
    ['tenant-admin of A uploads a pack', adminA, 'pack:upload', undefined, false],
    ['auditor of A reads A', auditorA, 'tenant:read', 'tenant-a', true],
    ['auditor of A reads A audit', auditorA, 'audit:read', 'tenant-a', true],
    ['auditor of A reads A records', auditorA, 'records:read', 'tenant-a', true],
    ['auditor of A reads B audit', auditorA, 'audit:read', 'tenant-b', false],
    ['auditor of A sets A subscriptions', auditorA, 'tenant:subscriptions', 'tenant-a', false],
    ['auditor of A issues a token', auditorA, 'token:issue', 'tenant-a', false],
  ];
  for (const [name, principal, action, tenant, allowed] of table) {
    it(`${allowed ? 'allows' : 'refuses'}: ${name}`, () => {
      expect(isAllowed(principal, action, tenant)).to.equal(allowed);
    });
  }

  it('lets a platform operator do every action except reading patient records', () => {
    for (const action of ALL_ACTIONS) {
      expect(isAllowed(operator, action, 'tenant-a'), action).to.equal(action !== 'records:read');
    }
  });

  it('refuses a tenant-scoped principal that has no tenant', () => {
    const broken: Principal = { tokenId: 't', role: 'tenant-admin' };
    for (const action of ALL_ACTIONS) {
      expect(isAllowed(broken, action, 'tenant-a'), action).to.equal(false);
    }
  });

  it('refuses an unknown role for every action', () => {
    const odd = { tokenId: 't', role: 'superuser' as Role };
    for (const action of [...ALL_ACTIONS, 'toString' as AdminAction]) {
      expect(isAllowed(odd, action), action).to.equal(false);
    }
  });

  describe('authorizeTokenIssue', () => {
    it('lets a tenant-admin issue only auditor tokens, only for its own tenant', () => {
      expect(() => {
        authorizeTokenIssue(adminA, 'auditor', 'tenant-a');
      }).to.not.throw();
      for (const [role, tenant] of [
        ['tenant-admin', 'tenant-a'],
        ['platform-operator', undefined],
        ['auditor', 'tenant-b'],
      ] as Array<[Role, string | undefined]>) {
        expect(
          () => {
            authorizeTokenIssue(adminA, role, tenant);
          },
          `${role} ${tenant ?? ''}`,
        ).to.throw(ForbiddenError);
      }
    });

    it('lets an operator issue any role', () => {
      for (const role of [
        'platform-operator',
        'rule-author',
        'tenant-admin',
        'auditor',
      ] as Role[]) {
        expect(() => {
          authorizeTokenIssue(
            operator,
            role,
            role === 'tenant-admin' || role === 'auditor' ? 'tenant-b' : undefined,
          );
        }).to.not.throw();
      }
    });
  });
});

/*
 * Checks the patch's fixed-base SM2 scalar multiplication (kms_sm2_mulg.h) against OpenSSL.
 *
 *   cc -O2 -I<dir holding kms_sm2_mulg.h> sm2-mulg-check.c -lcrypto -o check && ./check [RANDOM] [LADDER]
 *
 * - Booth recoding: the 37 digits of RANDOM random scalars (and of the edge scalars) sum back to the scalar;
 * - edge scalars, each against OpenSSL's EC_POINT_mul (its constant-time ladder): 1..300, n-300..n-1, 2^i - 1, 2^i,
 *   2^i + 1 and n - 2^i for every i < 256, scalars whose 7-bit Booth digits are all +64 or -64 or that make the
 *   running sum 0 before the last window, scalars with only the top or only the bottom window non-zero;
 * - LADDER (1,000) random scalars against EC_POINT_mul;
 * - RANDOM (100,000) random scalars a, b: mulg(a) + mulg(b) = mulg((a + b) mod n) with EC_POINT_add, and
 *   mulg(a) is on the curve (with mulg(1) = G this ties every tested scalar to the group law, at a fraction of a
 *   ladder's cost).
 * Prints "ok" and counts and exits 0, or prints the first mismatch and exits 1.
 */

#include <stdio.h>
#include <stdlib.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/obj_mac.h>
#include <openssl/rand.h>
#include "kms_sm2_mulg.h"

#ifndef KMS_SM2_MULG
#error "kms_sm2_mulg.h needs unsigned __int128"
#endif

static EC_GROUP* group;
static kms_sm2_table* table;
static BN_CTX* ctx;
static const BIGNUM* order;
static long checkedLadder, checkedLinear, checkedBooth;

static void die(const char* what, const BIGNUM* k)
{
	char* hex = k != NULL ? BN_bn2hex(k) : NULL;
	printf("MISMATCH %s k=%s\n", what, hex != NULL ? hex : "-");
	exit(1);
}

/* the fast k.G as an EC_POINT (NULL on failure) */
static EC_POINT* fast(const BIGNUM* k)
{
	unsigned char kb[32], xb[32], yb[32];
	if (BN_bn2binpad(k, kb, 32) != 32) die("scalar too long", k);
	if (!kms_sm2_mulg(table, kb, xb, yb)) return NULL;
	EC_POINT* p = EC_POINT_new(group);
	BIGNUM* x = BN_bin2bn(xb, 32, NULL);
	BIGNUM* y = BN_bin2bn(yb, 32, NULL);
	/* EC_POINT_set_affine_coordinates refuses a point off the curve */
	if (!EC_POINT_set_affine_coordinates(group, p, x, y, ctx)) die("point off the curve", k);
	BN_free(x);
	BN_free(y);
	return p;
}

static void checkBooth(const BIGNUM* k)
{
	unsigned char kb[32], s[34];
	BIGNUM* sum = BN_new();
	BIGNUM* term = BN_new();
	if (BN_bn2binpad(k, kb, 32) != 32) die("scalar too long", k);
	for (int i = 0; i < 32; i++) s[i] = kb[31 - i];
	s[32] = s[33] = 0;
	BN_zero(sum);
	for (int j = 0; j < KMS_SM2_WINDOWS; j++)
	{
		unsigned w = kms_sm2_booth7(kms_sm2_window(s, j));
		unsigned d = w >> 1;
		if (d > 64) die("Booth digit above 64", k);
		if (j == KMS_SM2_WINDOWS - 1 && (w & 1)) die("negative top digit", k);
		BN_set_word(term, d);
		BN_lshift(term, term, 7 * j);
		if (w & 1) BN_sub(sum, sum, term);
		else BN_add(sum, sum, term);
	}
	if (BN_cmp(sum, k) != 0) die("Booth digits do not sum to k", k);
	BN_free(sum);
	BN_free(term);
	checkedBooth++;
}

static void checkLadder(const BIGNUM* k)
{
	checkBooth(k);
	EC_POINT* want = EC_POINT_new(group);
	BIGNUM* kc = BN_dup(k);
	BN_set_flags(kc, BN_FLG_CONSTTIME);
	if (!EC_POINT_mul(group, want, kc, NULL, NULL, ctx)) die("EC_POINT_mul failed", k);
	EC_POINT* got = fast(k);
	if (got == NULL) die("mulg reported infinity", k);
	if (EC_POINT_cmp(group, want, got, ctx) != 0) die("mulg != EC_POINT_mul", k);
	EC_POINT_free(want);
	EC_POINT_free(got);
	BN_free(kc);
	checkedLadder++;
}

/* k = v mod n when v is in [1, n-1] (scalars outside are skipped) */
static void checkLadderIfScalar(const BIGNUM* v)
{
	if (BN_is_zero(v) || BN_is_negative(v) || BN_cmp(v, order) >= 0) return;
	checkLadder(v);
}

static void randomScalar(BIGNUM* k)
{
	do
	{
		if (!BN_rand_range(k, order)) die("BN_rand_range failed", NULL);
	}
	while (BN_is_zero(k));
}

int main(int argc, char** argv)
{
	long nRandom = argc > 1 ? atol(argv[1]) : 100000;
	long nLadder = argc > 2 ? atol(argv[2]) : 1000;
	group = EC_GROUP_new_by_curve_name(NID_sm2);
	ctx = BN_CTX_new();
	table = (kms_sm2_table*) malloc(sizeof(kms_sm2_table));
	if (group == NULL || ctx == NULL || table == NULL || !kms_sm2_table_build(table, group, ctx))
	{
		printf("setup failed\n");
		return 1;
	}
	order = EC_GROUP_get0_order(group);
	BIGNUM* k = BN_new();
	BIGNUM* a = BN_new();
	BIGNUM* b = BN_new();

	/* 0 and n: infinity, reported as a failure */
	unsigned char zero[32] = { 0 }, xb[32], yb[32], nb[32];
	if (kms_sm2_mulg(table, zero, xb, yb)) die("k = 0 gave a point", NULL);
	BN_bn2binpad(order, nb, 32);
	if (kms_sm2_mulg(table, nb, xb, yb)) die("k = n gave a point", order);

	/* small and near n */
	for (int i = 1; i <= 300; i++)
	{
		BN_set_word(k, i);
		checkLadder(k);
		BN_sub(k, order, k);
		checkLadder(k);
	}
	/* powers of two around them, and n - 2^i */
	for (int i = 0; i < 256; i++)
	{
		BN_zero(a);
		BN_set_bit(a, i);
		checkLadderIfScalar(a);
		BN_sub(k, a, BN_value_one());
		checkLadderIfScalar(k);
		BN_add(k, a, BN_value_one());
		checkLadderIfScalar(k);
		BN_sub(k, order, a);
		checkLadderIfScalar(k);
	}
	/* Booth digits all +64 (bit pattern 1000000 repeated with carries) or all -64, only the top or bottom window,
	   a running sum 0 before the top window (k = d.2^252) */
	for (int sign = 0; sign < 2; sign++)
	{
		BN_zero(k);
		for (int j = 0; j < KMS_SM2_WINDOWS - 1; j++)
		{
			BN_zero(a);
			BN_set_bit(a, 7 * j + 6);
			if (sign) BN_sub(k, k, a);
			else BN_add(k, k, a);
		}
		BN_nnmod(k, k, order, ctx);
		checkLadderIfScalar(k);
	}
	for (int d = 1; d <= 16; d++)
	{
		BN_set_word(k, d);
		BN_lshift(k, k, 252);
		checkLadderIfScalar(k);
		BN_add_word(k, 64);
		checkLadderIfScalar(k);
		BN_set_word(a, 0x7F);
		BN_add(a, k, a);
		checkLadderIfScalar(a);
	}
	for (int i = 1; i < 128; i++)
	{
		BN_set_word(k, i);
		checkLadder(k);
		BN_lshift(k, k, 7 * 35);
		checkLadderIfScalar(k);
	}
	long edge = checkedLadder;

	for (long i = 0; i < nLadder; i++)
	{
		randomScalar(k);
		checkLadder(k);
	}

	BN_set_word(k, 1);
	EC_POINT* one = fast(k);
	if (one == NULL || EC_POINT_cmp(group, one, EC_GROUP_get0_generator(group), ctx) != 0) die("1.G != G", k);
	EC_POINT_free(one);
	EC_POINT* sum = EC_POINT_new(group);
	for (long i = 0; i < nRandom; i++)
	{
		randomScalar(a);
		randomScalar(b);
		BN_mod_add(k, a, b, order, ctx);
		checkBooth(a);
		EC_POINT* pa = fast(a);
		EC_POINT* pb = fast(b);
		if (pa == NULL || pb == NULL) die("mulg reported infinity", a);
		if (!EC_POINT_add(group, sum, pa, pb, ctx)) die("EC_POINT_add failed", a);
		if (BN_is_zero(k))
		{
			if (!EC_POINT_is_at_infinity(group, sum)) die("a + b = n but mulg(a) + mulg(b) != O", a);
		}
		else
		{
			EC_POINT* pk = fast(k);
			if (pk == NULL || EC_POINT_cmp(group, sum, pk, ctx) != 0) die("mulg(a) + mulg(b) != mulg(a + b)", a);
			EC_POINT_free(pk);
		}
		EC_POINT_free(pa);
		EC_POINT_free(pb);
		checkedLinear++;
	}
	EC_POINT_free(sum);
	printf("ok: %ld edge and %ld random scalars equal to EC_POINT_mul, %ld random pairs a + b checked, "
	       "%ld Booth recodings\n", edge, checkedLadder - edge, checkedLinear, checkedBooth);
	return 0;
}

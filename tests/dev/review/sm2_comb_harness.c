/*
 * Review s21 (independent of sm2-mulg-check.c): drives kms_sm2_mulg.h's field and point code from stdin, one
 * operation a line, for tests/dev/test_sm2_comb_review.py to check against Python's integers:
 *
 *   mul A B | sqr A | add A B | sub A B | inv A   field elements as 64 hex digits (the raw limbs, big-endian)
 *   from A | to A                                 kms_sm2_fe_from_bytes / kms_sm2_fe_to_bytes
 *   booth K                                       the 37 signed digits the comb uses for K
 *   mulg K                                        "1 X Y" or "0" (infinity)
 *   ladder K                                      mulg K against OpenSSL's EC_POINT_mul: "same" or "DIFF"
 *   runs                                          every K = 2^a - 2^b and n - (2^a - 2^b) in [1, n-1] against
 *                                                 EC_POINT_mul: "runs CHECKED DIFFERENT"
 *   stats                                         "stats UNREDUCED EXCEPTIONAL" (instrumented header: the field
 *                                                 results not in [0, p) and the additions that met Q = +-T)
 *   jac K                                         (instrumented header) the comb's final Jacobian X, Y, Z for K:
 *                                                 12 limbs, Montgomery form, 16 hex digits each
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/obj_mac.h>
#include "kms_sm2_mulg.h"

#ifndef KMS_REVIEW_INSTRUMENT
static long kms_review_unreduced, kms_review_exceptional;
#endif

static EC_GROUP* group;
static BN_CTX* ctx;
static kms_sm2_table* table;

static int hexval(int c)
{
	if (c >= '0' && c <= '9') return c - '0';
	if (c >= 'a' && c <= 'f') return c - 'a' + 10;
	if (c >= 'A' && c <= 'F') return c - 'A' + 10;
	return -1;
}

static void bytes_in(const char* hex, unsigned char out[32])
{
	for (int i = 0; i < 32; i++) out[i] = (unsigned char) (hexval(hex[2 * i]) << 4 | hexval(hex[2 * i + 1]));
}

static void limbs_in(const char* hex, uint64_t r[4])
{
	unsigned char b[32];
	bytes_in(hex, b);
	for (int i = 0; i < 4; i++)
	{
		r[i] = 0;
		for (int j = 0; j < 8; j++) r[i] |= (uint64_t) b[31 - 8 * i - j] << (8 * j);
	}
}

static void limbs_out(const uint64_t a[4])
{
	printf("%016llx%016llx%016llx%016llx", (unsigned long long) a[3], (unsigned long long) a[2],
	       (unsigned long long) a[1], (unsigned long long) a[0]);
}

static void bytes_out(const unsigned char b[32])
{
	for (int i = 0; i < 32; i++) printf("%02x", b[i]);
}

/* 1 if the comb and EC_POINT_mul agree for k (32 bytes) */
static int same_as_ladder(const unsigned char k[32])
{
	unsigned char x[32], y[32], wx[32], wy[32];
	BIGNUM* kb = BN_bin2bn(k, 32, NULL);
	BIGNUM* bx = BN_new();
	BIGNUM* by = BN_new();
	EC_POINT* p = EC_POINT_new(group);
	int ok = EC_POINT_mul(group, p, kb, NULL, NULL, ctx) && EC_POINT_get_affine_coordinates(group, p, bx, by, ctx) &&
		 BN_bn2binpad(bx, wx, 32) == 32 && BN_bn2binpad(by, wy, 32) == 32 && kms_sm2_mulg(table, k, x, y) &&
		 memcmp(x, wx, 32) == 0 && memcmp(y, wy, 32) == 0;
	EC_POINT_free(p);
	BN_free(kb);
	BN_free(bx);
	BN_free(by);
	return ok;
}

static void runs(void)
{
	const BIGNUM* n = EC_GROUP_get0_order(group);
	BIGNUM* k = BN_new();
	BIGNUM* t = BN_new();
	long checked = 0, different = 0;
	unsigned char kb[32];
	for (int a = 1; a <= 256; a++)
	{
		for (int b = 0; b < a; b++)
		{
			BN_zero(k);
			BN_set_bit(k, a);
			BN_zero(t);
			BN_set_bit(t, b);
			BN_sub(k, k, t); /* 2^a - 2^b: a run of ones from bit b to bit a-1 */
			for (int neg = 0; neg < 2; neg++)
			{
				if (neg) BN_sub(t, n, k);
				else BN_copy(t, k);
				if (BN_is_zero(t) || BN_is_negative(t) || BN_cmp(t, n) >= 0) continue;
				BN_bn2binpad(t, kb, 32);
				checked++;
				if (!same_as_ladder(kb))
				{
					different++;
					char* h = BN_bn2hex(t);
					fprintf(stderr, "DIFF %s\n", h);
					OPENSSL_free(h);
				}
			}
		}
	}
	printf("runs %ld %ld\n", checked, different);
	BN_free(k);
	BN_free(t);
}

int main(void)
{
	group = EC_GROUP_new_by_curve_name(NID_sm2);
	ctx = BN_CTX_new();
	table = (kms_sm2_table*) malloc(sizeof(kms_sm2_table));
	if (group == NULL || ctx == NULL || table == NULL || !kms_sm2_table_build(table, group, ctx))
	{
		printf("setup failed\n");
		return 1;
	}
	kms_review_unreduced = 0; /* the table's build is not what is checked */
	kms_review_exceptional = 0;
	char line[512], op[16], ha[80], hb[80];
	while (fgets(line, sizeof(line), stdin) != NULL)
	{
		ha[0] = hb[0] = 0;
		if (sscanf(line, "%15s %79s %79s", op, ha, hb) < 1) continue;
		uint64_t a[4], b[4], r[4];
		unsigned char k[32], x[32], y[32];
		if (strcmp(op, "mul") == 0 || strcmp(op, "add") == 0 || strcmp(op, "sub") == 0)
		{
			limbs_in(ha, a);
			limbs_in(hb, b);
			if (op[0] == 'm') kms_sm2_fe_mul(r, a, b);
			else if (op[0] == 'a') kms_sm2_fe_add(r, a, b);
			else kms_sm2_fe_sub(r, a, b);
			limbs_out(r);
		}
		else if (strcmp(op, "sqr") == 0 || strcmp(op, "inv") == 0 || strcmp(op, "from") == 0)
		{
			limbs_in(ha, a);
			if (op[0] == 's') kms_sm2_fe_sqr(r, a);
			else if (op[0] == 'i') kms_sm2_fe_inv(r, a);
			else
			{
				bytes_in(ha, k);
				kms_sm2_fe_from_bytes(r, k);
			}
			limbs_out(r);
		}
		else if (strcmp(op, "to") == 0)
		{
			limbs_in(ha, a);
			kms_sm2_fe_to_bytes(x, a);
			bytes_out(x);
		}
		else if (strcmp(op, "booth") == 0)
		{
			unsigned char s[34];
			bytes_in(ha, k);
			for (int i = 0; i < 32; i++) s[i] = k[31 - i];
			s[32] = s[33] = 0;
			for (int j = 0; j < KMS_SM2_WINDOWS; j++)
			{
				unsigned w = kms_sm2_booth7(kms_sm2_window(s, j));
				printf("%s%d", j ? " " : "", (w & 1) ? -(int) (w >> 1) : (int) (w >> 1));
			}
		}
		else if (strcmp(op, "mulg") == 0)
		{
			bytes_in(ha, k);
			if (kms_sm2_mulg(table, k, x, y))
			{
				printf("1 ");
				bytes_out(x);
				printf(" ");
				bytes_out(y);
			}
			else printf("0");
		}
		else if (strcmp(op, "ladder") == 0)
		{
			bytes_in(ha, k);
			printf(same_as_ladder(k) ? "same" : "DIFF");
		}
		else if (strcmp(op, "runs") == 0)
		{
			runs();
			continue;
		}
#ifdef KMS_REVIEW_INSTRUMENT
		else if (strcmp(op, "jac") == 0)
		{
			bytes_in(ha, k);
			kms_sm2_mulg(table, k, x, y);
			for (int i = 0; i < 12; i++)
				printf("%s%016llx", i ? " " : "", (unsigned long long) kms_review_jac[i / 4][i % 4]);
		}
#endif
		else if (strcmp(op, "stats") == 0)
		{
			printf("stats %ld %ld", kms_review_unreduced, kms_review_exceptional);
		}
		else
		{
			printf("? %s", op);
		}
		printf("\n");
		fflush(stdout);
	}
	return 0;
}

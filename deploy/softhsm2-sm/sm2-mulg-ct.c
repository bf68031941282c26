/*
 * Checks that the patch's fixed-base SM2 scalar multiplication (kms_sm2_mulg.h) is constant-time in the sense
 * valgrind's memcheck can see ("ctgrind"): the scalar's bytes are marked undefined, so memcheck reports every
 * conditional branch and every memory address computed from them, i.e. from the secret.
 *
 *   cc -O2 -I<dir holding kms_sm2_mulg.h> sm2-mulg-ct.c -lcrypto -o ct
 *   valgrind --error-exitcode=3 ./ct
 *
 * Prints "ok" and exits 0 when memcheck found nothing (it exits 3 otherwise, with its reports on stderr). It says
 * nothing about instructions whose timing depends on their operands (none is used: 64x64-bit multiplications,
 * additions, logic) nor about what the compiler makes of the source elsewhere.
 */

#include <stdio.h>
#include <stdlib.h>
#include <openssl/ec.h>
#include <openssl/obj_mac.h>
#include <valgrind/memcheck.h>
#include "kms_sm2_mulg.h"

int main(void)
{
	/* a few scalars: small, large, and with zero digits (the selects for a zero digit and a sum at infinity) */
	static const unsigned char scalars[][32] = {
		{ [31] = 1 },
		{ [0] = 0xFF, [1] = 0xFF, [2] = 0xFF, [3] = 0xFE, [31] = 0x22 },
		{ [15] = 0x80 },
		{ 0x4B, 0x1D, 0x09, 0x7A, 0xC3, 0x5E, 0x66, 0x21, 0x90, 0x0F, 0xAA, 0x13, 0x57, 0x9B, 0xDF, 0x02,
		  0x46, 0x8A, 0xCE, 0x11, 0x33, 0x55, 0x77, 0x99, 0xBB, 0xDD, 0xFF, 0x10, 0x32, 0x54, 0x76, 0x98 },
	};
	EC_GROUP* group = EC_GROUP_new_by_curve_name(NID_sm2);
	BN_CTX* ctx = BN_CTX_new();
	kms_sm2_table* table = (kms_sm2_table*) malloc(sizeof(kms_sm2_table));
	if (group == NULL || ctx == NULL || table == NULL || !kms_sm2_table_build(table, group, ctx))
	{
		printf("setup failed\n");
		return 1;
	}
	for (size_t i = 0; i < sizeof(scalars) / sizeof(scalars[0]); i++)
	{
		unsigned char k[32], x[32], y[32];
		memcpy(k, scalars[i], sizeof(k));
		VALGRIND_MAKE_MEM_UNDEFINED(k, sizeof(k));	/* secret from here on */
		int ok = kms_sm2_mulg(table, k, x, y);
		/* the results are public (r, the public key): declassify them before branching on them */
		VALGRIND_MAKE_MEM_DEFINED(&ok, sizeof(ok));
		VALGRIND_MAKE_MEM_DEFINED(x, sizeof(x));
		VALGRIND_MAKE_MEM_DEFINED(y, sizeof(y));
		if (!ok)
		{
			printf("k.G failed for scalar %zu\n", i);
			return 1;
		}
	}
	printf("ok\n");
	free(table);
	BN_CTX_free(ctx);
	EC_GROUP_free(group);
	return 0;
}

/*
 * Review s21: what kms_sm2_mulg() leaves on the stack. Runs the comb for the scalar K (64 hex digits), then, at the
 * same call depth, reads the dead stack below and counts the 64-bit words equal to one of WORD... (hex): the test
 * passes the final Jacobian accumulator's X, Y, Z limbs (Montgomery form; printed by an instrumented build) and
 * K's limbs. With BURN (a first argument "burn"), 32 KiB of stack are cleared after the comb, as a fix would.
 *
 *   residue [burn] K WORD...   prints "hits H" (H words of the dead stack found among WORD...)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/ec.h>
#include <openssl/obj_mac.h>
#include "kms_sm2_mulg.h"

#define SCAN_BYTES 40960

static __attribute__((noinline)) int comb(const kms_sm2_table* table, const unsigned char* k, unsigned char* x,
					  unsigned char* y)
{
	return kms_sm2_mulg(table, k, x, y);
}

static __attribute__((noinline)) void burn(void)
{
	unsigned char area[32768];
	OPENSSL_cleanse(area, sizeof(area));
}

static __attribute__((noinline)) long scan(const uint64_t* words, int count)
{
	volatile uint64_t* top = (volatile uint64_t*) __builtin_frame_address(0);
	long hits = 0;
	for (long i = 8; i < SCAN_BYTES / 8; i++)
	{
		uint64_t v = top[-i];
		for (int j = 0; j < count; j++) hits += v == words[j] && v != 0;
	}
	return hits;
}

int main(int argc, char** argv)
{
	int burning = argc > 1 && strcmp(argv[1], "burn") == 0;
	int first = 1 + burning;
	if (argc < first + 2) return 2;
	EC_GROUP* group = EC_GROUP_new_by_curve_name(NID_sm2);
	BN_CTX* ctx = BN_CTX_new();
	kms_sm2_table* table = (kms_sm2_table*) malloc(sizeof(kms_sm2_table));
	if (group == NULL || ctx == NULL || table == NULL || !kms_sm2_table_build(table, group, ctx)) return 1;
	unsigned char k[32], x[32], y[32];
	for (int i = 0; i < 32; i++) sscanf(argv[first] + 2 * i, "%2hhx", &k[i]);
	int count = argc - first - 1;
	uint64_t* words = (uint64_t*) calloc((size_t) count, sizeof(uint64_t));
	for (int i = 0; i < count; i++) words[i] = strtoull(argv[first + 1 + i], NULL, 16);
	if (!comb(table, k, x, y)) return 1;
	memset(k, 0, sizeof(k));
	if (burning) burn();
	printf("hits %ld\n", scan(words, count));
	return 0;
}

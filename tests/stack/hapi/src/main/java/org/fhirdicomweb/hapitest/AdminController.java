package org.fhirdicomweb.hapitest;

import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.api.model.ExpungeOptions;
import java.util.Map;
import org.springframework.web.bind.annotation.GetMapping;
import org.springframework.web.bind.annotation.PathVariable;
import org.springframework.web.bind.annotation.PostMapping;
import org.springframework.web.bind.annotation.RequestMapping;
import org.springframework.web.bind.annotation.RestController;

/**
 * The test-only endpoints the Medplum test server also answers, so both launchers look alike to
 * the fixtures: health, request counters, and emptying the server.
 */
@RestController
@RequestMapping("/__admin")
public class AdminController {

	private final IFhirSystemDao<?, ?> systemDao;
	private final RequestCounter counter;
	private final JpaStorageSettings storageSettings;

	public AdminController(
			IFhirSystemDao<?, ?> systemDao, RequestCounter counter, JpaStorageSettings storageSettings) {
		this.systemDao = systemDao;
		this.counter = counter;
		this.storageSettings = storageSettings;
	}

	@GetMapping("/health")
	public Map<String, String> health() {
		return Map.of("status", "ok");
	}

	@GetMapping("/stats")
	public Map<String, Object> stats() {
		return counter.snapshot();
	}

	@PostMapping("/reset-stats")
	public Map<String, String> resetStats() {
		counter.reset();
		return Map.of("status", "ok");
	}

	/**
	 * Which ids clients may choose when creating by PUT: ALPHANUMERIC (HAPI's default: any id with
	 * a non-digit), ANY, or NOT_ALLOWED (the server assigns every id). Tests switch it to check the
	 * bridge against a server that refuses client ids, without a second server; clear() keeps it.
	 */
	@PostMapping("/client-ids/{strategy}")
	public Map<String, String> clientIds(@PathVariable("strategy") String strategy) {
		storageSettings.setResourceClientIdStrategy(JpaStorageSettings.ClientIdStrategyEnum.valueOf(strategy));
		return Map.of("status", "ok", "client_ids", strategy);
	}

	/** Drops every resource, every version and every cached search: $expunge with expungeEverything. */
	@PostMapping("/clear")
	public Map<String, String> clear() {
		systemDao.expunge(new ExpungeOptions().setExpungeEverything(true), null);
		return Map.of("status", "ok");
	}
}
